"""A video model exported as transformers' LLaVA-NeXT-Video answers, in plain transformers, with mmtrain's tokens;
and what that class cannot compute is refused with the reason."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from mmtrain.args import ConfigError
from mmtrain.model.pretrained import save_pretrained

from .test_pretrained import _trained_model

# Plain transformers, in a subprocess outside the repository. The processor's video half
# needs torchvision; without it the frames are given as images (each its own base tile:
# the whole frame at the tile size, normalised as the tower normalises) and <video> is
# expanded as LlavaNextVideoProcessor expands it (a frame's patches // 4 per frame).
GENERATE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, LlavaNextProcessor

    folder, cases_path, out = sys.argv[1:4]
    with open(cases_path) as f:
        cases = json.load(f)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(model).__name__ == "LlavaNextVideoForConditionalGeneration", type(model).__name__
    with_torchvision = importlib.util.find_spec("torchvision") is not None
    processor = AutoProcessor.from_pretrained(folder) if with_torchvision else LlavaNextProcessor.from_pretrained(folder)
    tiler = AutoImageProcessor.from_pretrained(folder)
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    results = {}
    for name, case in cases.items():
        prompt = processor.apply_chat_template(case["messages"], add_generation_prompt=True)
        frames = [Image.open(p).convert("RGB") for p in case["frames"]]
        images = [Image.open(p).convert("RGB") for p in case["images"]] or None
        if with_torchvision:
            inputs = processor(images=images, videos=[frames], text=prompt, return_tensors="pt")
        else:
            text = prompt.replace("<video>", "<video>" * (side * side // 4 * len(frames)))
            inputs = processor(images=images, text=text, return_tensors="pt")
            inputs["pixel_values_videos"] = torch.stack([tiler(images=[f], return_tensors="pt")["pixel_values"][0, 0] for f in frames])[None]
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        results[name] = {"prompt": inputs["input_ids"][0].tolist(), "ids": ids[0, inputs["input_ids"].shape[1]:].tolist()}
    results["torchvision"] = with_torchvision
    assert not any(m == "mmtrain" or m.startswith("mmtrain.") for m in sys.modules), "mmtrain was imported"
    with open(out, "w") as f:
        json.dump(results, f)
    """
)


def _frames(folder, count: int) -> list[str]:
    paths = []
    for k in range(count):
        image = Image.new("RGB", (64, 64), (255, 255, 255))
        image.paste(Image.new("RGB", (16, 16), (200, 30 * k, 40)), (8 * k, 24))
        paths.append(str(folder / f"frame{k}.png"))
        image.save(paths[-1])
    return paths


def test_a_llava_next_video_export_generates_what_mmtrain_generates(tmp_path, tiny_args):
    from mmtrain.data.template import encode_conversation
    from mmtrain.export import export_llava
    from mmtrain.model.generation import SamplingOptions, generate

    args, built = _trained_model(tiny_args, anyres_max_tiles=4, video_pool=2)
    frames = _frames(tmp_path, 4)
    still = Image.new("RGB", (150, 60), (0, 0, 255))
    still.putpixel((1, 1), (255, 255, 255))
    still.save(tmp_path / "still.png")
    cases = {
        "one video": ("<video>\nWhat moves?", [], {"messages": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]}),
        "image and video": ("<image>\n<video>\nSame color?", [str(tmp_path / "still.png")], {"messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Same color?"}]}]}),
    }
    tok = built.tokenizer
    tower = built.image_processor.tower_processor
    expected, prompts = {}, {}
    for name, (text, images, _) in cases.items():
        decoded = [Image.open(p).convert("RGB") for p in images]
        ids = encode_conversation([{"role": "user", "text": text}], tok, built.image_tokens, add_generation_prompt=True,
                                  image_sizes=[(im.height, im.width) for im in decoded], video_frames=[len(frames)]).input_ids
        pixels = built.image_processor(images=decoded, return_tensors="pt")["pixel_values"] if decoded else torch.zeros(0, 3, 64, 64)
        video = tower(images=[Image.open(p).convert("RGB") for p in frames], return_tensors="pt")["pixel_values"]
        sizes = torch.tensor([(im.height, im.width) for im in decoded]).reshape(-1, 2)
        expected[name] = generate(built.model, [torch.tensor(ids)], [pixels], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  options=SamplingOptions(max_new_tokens=8), image_sizes=[sizes], videos=[video])[0]
        prompts[name] = ids
    assert expected["one video"] != expected["image and video"]

    folder = tmp_path / "export"
    save_pretrained(str(folder), built.model.state_dict(), built.model, tok, built.image_processor, args)
    export_llava(str(folder), str(tmp_path / "hf"), "llava_next_video")
    (tmp_path / "cases.json").write_text(json.dumps({
        name: {**case, "frames": frames, "images": images} for name, (_, images, case) in cases.items()
    }))
    script = tmp_path / "generate.py"
    script.write_text(GENERATE_SCRIPT)
    run_dir = tmp_path / "elsewhere"  # outside the repository: mmtrain cannot be imported by accident
    run_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "hf"), str(tmp_path / "cases.json"), str(tmp_path / "generated.json")],
        cwd=run_dir, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "generated.json").read_text())
    print("video inputs made by", "LlavaNextVideoProcessor itself" if got["torchvision"] else "hand (no torchvision): frames given as images")
    for name, ids in expected.items():
        assert got[name]["prompt"] == prompts[name], f"{name}: the exported chat template's prompt is not the one training used"
        new = got[name]["ids"]
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert new == ids and len(ids) >= 4, (name, got[name]["ids"], ids)


@pytest.mark.parametrize(
    ("flags", "format", "says"),
    [
        ({"anyres_max_tiles": 4, "video_pool": 1}, "llava_next_video", "patches // 4"),
        ({"video_pool": 2}, "llava_next_video", "always tiles images"),
        ({"anyres_max_tiles": 4}, "llava_next_video", "reads no videos"),
        ({"anyres_max_tiles": 4, "video_pool": 2}, "llava_next", "use --format llava_next_video"),
        ({"video_pool": 2}, "llava", "use --format llava_next_video"),
    ],
    ids=["unpooled", "untiled", "no videos", "video model as llava_next", "video model as llava"],
)
def test_what_llava_next_video_cannot_compute_is_refused_with_the_reason(tmp_path, tiny_args, flags, format, says):
    from mmtrain.export import export_llava

    args = tiny_args(**flags)
    torch.manual_seed(0)
    from mmtrain.model import build_model

    built = build_model(args)
    folder = tmp_path / "export"
    save_pretrained(str(folder), built.model.state_dict(), built.model, built.tokenizer, built.image_processor, args)
    with pytest.raises(ConfigError, match=says):
        export_llava(str(folder), str(tmp_path / "hf"), format)
