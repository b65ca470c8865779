"""AnyRes tiles and native aspect ratios through the data pipeline and the real entry point.

Images of every aspect class (wide, tall, small) take their own tile grids (or patch
grids) and token counts: each sample's length as measured up front is the length it encodes to (so a token
budget stays exact), and a run under a token budget killed after a checkpoint resumes to
the uninterrupted run's losses.
"""

from __future__ import annotations

import pytest

from tests.aspect_data import write_aspect_dataset

from .conftest import common_flags, kill_and_resume, train_losses

@pytest.fixture(scope="module")
def aspect_data(tmp_path_factory):
    """A LLaVA-format JSON of 40 one-image questions whose images have five shapes."""
    return write_aspect_dataset(tmp_path_factory.mktemp("aspects"), 40)


SIZED = {
    "anyres": dict(anyres_max_tiles=4),
    "native-aspect": dict(vision_model_name_or_path="tiny-siglip2", vision_max_patches=48),
}


@pytest.mark.parametrize("kind", SIZED)
def test_measured_lengths_are_the_encoded_lengths_and_images_keep_their_grids(model_folders, aspect_data, data_path, kind):
    from mmtrain.args import DataArguments, ModelArguments
    from mmtrain.data import build_datasets
    from mmtrain.data.collator import Collator
    from mmtrain.model import build_model

    built = build_model(ModelArguments(**{
        "lm_model_name_or_path": model_folders["tiny-llama"], "vision_model_name_or_path": model_folders["tiny-clip"], **SIZED[kind],
    }))
    args = DataArguments(dataset_names=[str(aspect_data)], data_path=str(data_path), eval_ratio=0.0)
    train = build_datasets(args, built.tokenizer, built.image_processor, built.image_tokens, seed=0).train
    sized = built.image_tokens.sized
    counts = set()
    for i, entry in enumerate(train.entries):
        item = train[i]
        (size,) = item["image_sizes"].tolist()
        assert len(item["input_ids"]) == entry.length, i
        assert int((item["input_ids"] == built.image_tokens.image_id).sum()) == sized.features(tuple(size))
        assert item["pixel_values"].shape[0] == sized.tiles(tuple(size))
        counts.add(sized.features(tuple(size)))
    assert len(counts) >= 3  # the five shapes take at least three token counts
    batch = Collator(built.tokenizer.pad_token_id)([train[i] for i in range(5)])
    assert batch["image_counts"].tolist() == [1] * 5 and len(batch["image_sizes"]) == 5
    built.model(**batch).loss.backward()  # the five shapes' spans and features line up in one batch


def test_samples_over_the_image_token_cap_are_dropped_and_counted(model_folders, aspect_data, data_path):
    from mmtrain.args import DataArguments, ModelArguments
    from mmtrain.data import build_datasets
    from mmtrain.model import build_model

    built = build_model(ModelArguments(lm_model_name_or_path=model_folders["tiny-llama"], vision_model_name_or_path=model_folders["tiny-clip"], anyres_max_tiles=4))
    args = DataArguments(dataset_names=[str(aspect_data)], data_path=str(data_path), eval_ratio=0.0, max_image_tokens=200)
    data = build_datasets(args, built.tokenizer, built.image_processor, built.image_tokens, seed=0)
    kept = [int((data.train[i]["input_ids"] == built.image_tokens.image_id).sum()) for i in range(len(data.train))]
    assert kept and max(kept) <= 200
    assert data.static_report["dropped_overlength_train"] == 40 - len(kept) > 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", SIZED)
def test_a_run_under_a_token_budget_killed_and_resumed_gives_the_same_losses(model_folders, aspect_data, data_path, tmp_path, kind):
    sized = {**SIZED[kind], "vision_model_name_or_path": model_folders["tiny-clip"]} if kind == "anyres" else SIZED[kind]
    budget = 900 if kind == "anyres" else 200  # a few samples per micro-batch either way (native images take <= 48 tokens)

    def flags(out, **extra):
        return common_flags(
            model_folders, data_path, output_dir=out, dataset_names=str(aspect_data), **sized, max_tokens_per_batch=budget,
            eval_ratio=0.1, num_train_epochs=1, save_steps=3, eval_generate=2,
            export_each_epoch="false", **extra,
        )

    reference, out, _ = kill_and_resume(flags, tmp_path, 3, config="single_process.yaml")
    expected, resumed = train_losses(reference), train_losses(out)
    assert len(expected) >= 6 and sorted(resumed) == sorted(expected)
    for step in range(4, max(expected) + 1):
        assert resumed[step] == expected[step], step


def test_tiles_at_zero3_with_vision_lora_train_and_answer_held_out_questions(model_folders, aspect_data, data_path, tmp_path):
    """ZeRO-3 partitions the projector's newline; evaluation-time generation reads it outside the
    projector's forward, where ZeRO-3 has released it, so it must be gathered there."""
    from .conftest import launch, metrics

    out = tmp_path / "zero3"
    launch(common_flags(
        model_folders, data_path, output_dir=out, dataset_names=str(aspect_data), anyres_max_tiles=4, vis_lora_dim=4,
        max_steps=2, eval_steps=2, eval_generate=2, export_each_epoch="false",
    ), config="zero3.yaml")
    assert [r["step"] for r in metrics(out) if r["split"] == "eval"] == [2]  # the evaluation, generation included, ran
