"""Videos through the data pipeline and the real entry point.

A tiny video dataset written here: videos given as frame images (the test draws them) in
both data formats, and clip files written with PyAV where it is installed. Each sample's
length measured up front is the length it encodes to, frames counted (so a budget stays
exact); a run trains on it through ``mmtrain/train.py`` under a token budget and its
export, written as LLaVA-NeXT-Video, answers a video prompt with the trained model's
tokens; a clip that cannot be decoded stops the run before any weights load, naming its
file and record.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from .conftest import common_flags, launch, metrics, train_losses

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230)}


def frame(color: tuple[int, int, int], k: int) -> Image.Image:
    """A 64 px frame: a square of ``color`` moving to the right with ``k``."""
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    image.paste(Image.new("RGB", (20, 20), color), (4 * k, 20))
    return image


def write_clip(path, frames: list[Image.Image], rate: int = 10) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def video_records(folder, n: int, clips: bool) -> list[dict]:
    """``n`` one-video questions: frame lists (LLaVA and messages layouts, 3 to 11 frames), every third a clip file when ``clips``."""
    records = []
    for i in range(n):
        name, color = list(COLORS.items())[i % len(COLORS)]
        count = 3 + i % 9
        frames = [frame(color, k) for k in range(count)]
        if clips and i % 3 == 0:
            write_clip(folder / f"clip{i}.mp4", frames)
            video = f"clip{i}.mp4"
        else:
            video = []
            for k, image in enumerate(frames):
                image.save(folder / f"v{i}_{k}.png")
                video.append(f"v{i}_{k}.png")
        if i % 2:
            records.append({"video": video, "conversations": [
                {"from": "human", "value": "<video>\nWhat color is the moving square?"}, {"from": "gpt", "value": name}]})
        else:
            records.append({"videos": [video], "messages": [
                {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What color is the moving square?"}]},
                {"role": "assistant", "content": name}]})
    # one record with an image and a video, no placeholders: both go before the question
    frame(COLORS["red"], 0).save(folder / "still.png")
    records.append({"image": "still.png", "video": ["v1_0.png", "v1_1.png"], "conversations": [
        {"from": "human", "value": "Same color?"}, {"from": "gpt", "value": "yes"}]})
    return records


@pytest.fixture(scope="module")
def video_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    try:
        import av  # noqa: F401

        clips = True
    except ImportError:
        clips = False
    path = folder / "train.json"
    path.write_text(json.dumps(video_records(folder, 24, clips)))
    return path


@pytest.fixture(scope="module")
def video_model(model_folders):
    from mmtrain.args import ModelArguments
    from mmtrain.model import build_model

    return build_model(ModelArguments(
        lm_model_name_or_path=model_folders["tiny-llama"], vision_model_name_or_path=model_folders["tiny-clip"], video_pool=2,
    ))


def test_measured_lengths_are_the_encoded_lengths_with_frames_counted(video_model, video_data, data_path):
    from mmtrain.args import DataArguments
    from mmtrain.data import build_datasets
    from mmtrain.data.collator import Collator

    built = video_model
    tokens = built.image_tokens
    assert tokens.per_frame == 16  # tiny-clip: an 8x8 patch grid, pooled 2x2
    args = DataArguments(dataset_names=[str(video_data)], data_path=str(data_path), eval_ratio=0.0, max_frames=6)
    bundle = build_datasets(args, built.tokenizer, built.image_processor, tokens, seed=0)
    train = bundle.train
    frames_seen = set()
    for i, entry in enumerate(train.entries):
        item = train[i]
        (frames,) = item["video_frames"].tolist()
        assert len(item["input_ids"]) == entry.length, i
        assert int((item["input_ids"] == tokens.video_id).sum()) == frames * tokens.per_frame
        assert item["pixel_values_videos"].shape == (frames, 3, 64, 64)
        assert entry.num_images == frames + item["pixel_values"].shape[0]  # each frame is one encoder input
        assert frames == min(6, train.records[entry.row]["video_frames"][0])
        frames_seen.add(frames)
    assert frames_seen == {2, 3, 4, 5, 6}  # short videos keep all their frames, long ones are thinned to --max_frames
    assert bundle.report["videos_train"] == 25 and bundle.report["frames_train"] == sum(e.num_images for e in train.entries) - 1
    batch = Collator(built.tokenizer.pad_token_id)([train[i] for i in range(len(train.entries) - 4, len(train.entries))])
    assert batch["video_frames"].shape == (4,) and batch["pixel_values_videos"].shape[0] == int(batch["video_frames"].sum())
    built.model.zero_grad()
    built.model(**batch).loss.backward()  # videos and the image of one record land on their own spans in one batch
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in built.model.projector.parameters())


def test_joined_samples_keep_each_video_on_its_own_span(video_model, video_data, data_path):
    from mmtrain.args import DataArguments
    from mmtrain.data import build_datasets

    tokens = video_model.image_tokens
    args = DataArguments(dataset_names=[str(video_data)], data_path=str(data_path), eval_ratio=0.0, max_frames=6, dataset_concatenate_samples=3)
    train = build_datasets(args, video_model.tokenizer, video_model.image_processor, tokens, seed=0).train
    sizes = train.item_sizes()
    assert any(len(train.group(i)) > 1 for i in range(len(train)))
    for i in range(len(train)):
        item = train[i]
        frames = item["video_frames"].tolist()
        assert len(frames) == len(train.group(i))  # one video a record
        assert int((item["input_ids"] == tokens.video_id).sum()) == sum(frames) * tokens.per_frame
        assert item["pixel_values_videos"].shape[0] == sum(frames)
        assert len(item["input_ids"]) <= sizes[i][0] and sum(frames) + item["pixel_values"].shape[0] == sizes[i][1]


def test_frames_are_pooled_before_the_projector_as_llava_next_video_pools(video_model):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoModel

    config = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2).to_dict(),
        text_config=LlamaConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=32).to_dict(),
        spatial_pool_stride=2, spatial_pool_mode="average",
    )
    reference = LlavaNextVideoModel(config)
    features = torch.randn(5, 64, 16)  # 5 frames of an 8x8 grid
    from mmtrain.model.video import pool_frames

    assert torch.allclose(pool_frames(features, (8, 8), 2), reference.vision_resampler(features), atol=1e-6)


def test_a_video_model_trains_under_a_budget_and_exports_as_llava_next_video(model_folders, video_data, data_path, tmp_path):
    """train.py on the video data (AnyRes tiles for its one image, frames pooled 2x2), then its epoch export written as
    LlavaNextVideoForConditionalGeneration, which answers a video prompt with the trained model's tokens."""
    from transformers import AutoImageProcessor, LlavaNextProcessor, LlavaNextVideoForConditionalGeneration

    from mmtrain.data.template import encode_conversation
    from mmtrain.export import export_llava
    from mmtrain.model.generation import SamplingOptions, generate
    from mmtrain.model.pretrained import load_pretrained

    out = tmp_path / "run"
    launch(common_flags(
        model_folders, data_path, output_dir=out, dataset_names=str(video_data), video_pool=2, anyres_max_tiles=4, max_frames=4,
        eval_ratio=0.2, max_tokens_per_batch=400, max_images_per_batch=9, eval_generate=2,
    ))
    losses = train_losses(out)
    assert len(losses) >= 4 and all(0 < loss < 20 for loss in losses.values())
    evaluated = [m for m in metrics(out) if m["split"] != "train"]
    assert evaluated and evaluated[-1]["loss"] > 0 and evaluated[-1]["questions"] == 2  # answers generated from videos

    export_llava(str(out / "epoch-0"), str(tmp_path / "hf"), "llava_next_video")
    frames = [frame(COLORS["green"], k) for k in range(4)]
    built = load_pretrained(str(out / "epoch-0"))
    ids = encode_conversation([{"role": "user", "text": "<video>\nWhat color is the moving square?"}], built.tokenizer, built.image_tokens,
                              add_generation_prompt=True, video_frames=[4]).input_ids
    video = built.image_processor.tower_processor(images=frames, return_tensors="pt")["pixel_values"]
    tok = built.tokenizer
    expected = generate(built.model, [torch.tensor(ids)], [torch.zeros(0, 3, 64, 64)], eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, options=SamplingOptions(max_new_tokens=6), image_sizes=[torch.zeros(0, 2)],
                        videos=[video])[0]

    hf = LlavaNextVideoForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    processor = LlavaNextProcessor.from_pretrained(str(tmp_path / "hf"))  # the image half: the video half needs torchvision
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What color is the moving square?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt.replace("<video>", "<video>" * (4 * 16)), return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ids
    tiler = AutoImageProcessor.from_pretrained(str(tmp_path / "hf"))  # frames given as images: each its own base tile
    pixels = torch.stack([tiler(images=[f], return_tensors="pt")["pixel_values"][0, 0] for f in frames])[None]
    with torch.no_grad():
        new = hf.generate(**inputs, pixel_values_videos=pixels, max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
        # the trained model answers in few tokens (often eos at once): the logits say more than the tokens
        got = hf(**inputs, pixel_values_videos=pixels).logits
        want = built.model(torch.tensor([ids]), pixel_values_videos=video, image_sizes=torch.zeros(0, 2, dtype=torch.long), return_logits=True).logits
    assert (new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new) == expected
    torch.testing.assert_close(got[..., : want.shape[-1]], want, rtol=1e-4, atol=1e-4)
    assert want[0, -1].std() > 0.1  # not a flat answer


def test_a_clip_that_cannot_be_decoded_stops_the_run_naming_its_file_and_record(model_folders, data_path, tmp_path):
    pytest.importorskip("av")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing after")
    frames = []
    for k in range(3):
        frame(COLORS["red"], k).save(tmp_path / f"f{k}.png")
        frames.append(f"f{k}.png")
    records = [
        {"video": frames, "conversations": [{"from": "human", "value": "<video>\nColor?"}, {"from": "gpt", "value": "red"}]},
        {"video": "broken.mp4", "conversations": [{"from": "human", "value": "<video>\nColor?"}, {"from": "gpt", "value": "red"}]},
    ]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    proc = launch(common_flags(
        model_folders, data_path, output_dir=tmp_path / "run", dataset_names=str(path), video_pool=2, eval_ratio=0.0, max_steps=1,
    ), check=False, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "broken.mp4" in line]
    assert lines and f"{path}: record 1" in lines[-1] and "cannot be decoded" in lines[-1], proc.stderr[-2000:]
    assert "trainable" not in proc.stdout + proc.stderr  # no model was built


def test_frames_are_sampled_uniformly_or_at_a_rate_and_counted_from_the_container(tmp_path):
    from mmtrain.data.video import sample_indices, sampled_frame_count

    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]
    assert sample_indices(23, 8) == [0, 3, 6, 9, 13, 16, 19, 22]  # spread, first and last kept
    assert sample_indices(23, 8, fps=2, native_fps=10) == [0, 5, 10, 15, 20]  # every fifth frame of a 10 fps clip
    assert sample_indices(23, 3, fps=2, native_fps=10) == [0, 10, 20]  # then thinned to --max_frames
    assert sample_indices(4, 8, fps=30, native_fps=10) == [0, 1, 2, 3]  # no more frames than the clip has
    pytest.importorskip("av")
    write_clip(tmp_path / "c.mp4", [frame(COLORS["blue"], k % 12) for k in range(23)])
    assert sampled_frame_count(str(tmp_path / "c.mp4"), "x", 8) == 8
    assert sampled_frame_count(str(tmp_path / "c.mp4"), "x", 8, fps=2) == 5


def test_videos_a_model_or_a_budget_cannot_take_are_refused_before_any_weights(video_data, data_path):
    from mmtrain.args import DataArguments
    from mmtrain.data import DataError, read_sources
    from mmtrain.data.build import check_videos_read

    sources = read_sources(DataArguments(dataset_names=[str(video_data)], data_path=str(data_path), eval_ratio=0.0))
    check_videos_read(sources, reads_videos=True)
    with pytest.raises(DataError, match=r"train.json: record 0 has a video, and the model reads none: set --video_pool"):
        check_videos_read(sources, reads_videos=False)
    # record 2's five frames (of --max_frames 8) can never fit a budget of four images
    budget = DataArguments(dataset_names=[str(video_data)], data_path=str(data_path), eval_ratio=0.0, max_tokens_per_batch=400, max_images_per_batch=4)
    with pytest.raises(DataError, match=r"train.json: record 2: video of 5 frame images .* gives 5 frames, more than --max_images_per_batch 4"):
        read_sources(budget)


def test_video_flags_are_checked_before_any_weights():
    from mmtrain.args import ConfigError, DataArguments, ModelArguments

    with pytest.raises(ConfigError, match="--max_frames"):
        DataArguments(max_frames=0)
    with pytest.raises(ConfigError, match="--video_fps"):
        DataArguments(video_fps=-1.0)
    with pytest.raises(ConfigError, match="video_pool"):
        ModelArguments(video_pool=-1)
    with pytest.raises(ConfigError, match="perceiver"):
        ModelArguments(video_pool=2, vis_proj="perceiver")
