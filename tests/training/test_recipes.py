"""The shipped recipes: every YAML validates, and LLaVA's two stages run end to end on the tiny presets.

Stage 1 trains the projector on a frozen LM; stage 2 starts from stage 1's export
(``--init_from``) and trains the LM too. Both run through ``accelerate launch`` exactly as
their headers say, only their output folders moved into the test's.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmtrain.args import ConfigError, ModelArguments, parse_args
from mmtrain.memory import MemorySetup, estimate, GiB

from .conftest import CONFIGS, REPO, common_flags, launch, metrics
from .test_bad_input import _train

RECIPES = REPO / "recipes"
SHIPPED = sorted(str(p.relative_to(RECIPES)) for p in RECIPES.rglob("*.yaml"))
# Model folders the 7B recipes expect a user to download, stood in for by presets of the same shapes.
PRESET_FOR = {"models/vicuna-7b-v1.5": "llama-2-7b", "models/clip-vit-large-patch14-336": "clip-vit-large-patch14-336"}
GPUS_IN_HEADER = re.compile(r"--num_processes (\d+)")


def _header(path: Path) -> list[str]:
    lines = path.read_text().split("\n")
    return [line for line in lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]]


def _parse(name: str, *extra: str):
    path = RECIPES / name
    raw = path.read_text()
    overrides = []
    for folder, preset in PRESET_FOR.items():
        if folder in raw:
            flag = "--lm_model_name_or_path" if "vicuna" in folder else "--vision_model_name_or_path"
            overrides += [flag, preset]
    return parse_args(["--config", str(path), *overrides, *extra])


def test_the_promised_recipes_are_shipped():
    assert {"llava-1.5-7b/stage1_pretrain.yaml", "llava-1.5-7b/stage2_finetune.yaml", "tiny/stage1_pretrain.yaml", "tiny/stage2_finetune.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_recipe_opens_with_its_command_and_data_and_validates(name):
    path = RECIPES / name
    header = _header(path)
    assert len(header) >= 3, "opens with a comment saying what it is"
    commands = [line for line in header if "mmtrain/train.py" in line]
    assert commands and all(f"--config recipes/{name}" in c for c in commands), "the header runs this very file"
    config = re.search(r"--config_file accelerate_configs/(\S+)", commands[0]).group(1)
    assert (CONFIGS / config).is_file(), f"the header names {config}, which is not shipped"
    assert any(line.startswith("# Data:") for line in header), "says what data it expects"
    model_args, data_args, train_args = _parse(name)
    assert train_args.output_dir.startswith("outputs/")


def _global_batch(name: str) -> int:
    gpus = int(GPUS_IN_HEADER.search("\n".join(_header(RECIPES / name))).group(1))
    _, _, train_args = _parse(name)
    return train_args.per_device_train_batch_size * (train_args.gradient_accumulation_steps or 1) * gpus


def test_llava_recipes_carry_the_published_settings():
    """LLaVA-1.5: stage 1 projector only at 1e-3, batch 256; stage 2 whole LM at 2e-5, batch 128 (LoRA: r128/a256, 2e-4)."""
    for name in ("llava-1.5-7b/stage1_pretrain.yaml", "llava-1.5-7b/stage2_finetune.yaml", "llava-1.5-7b/stage2_finetune_lora.yaml"):
        model_args, data_args, train_args = _parse(name)
        assert (model_args.vis_proj, model_args.vision_feature_layer, model_args.vision_keep_cls) == ("mlp", -2, False)
        assert not model_args.vision_trainable
        assert (train_args.num_train_epochs, train_args.num_warmup_steps, train_args.lr_scheduler_type) == (1, 0.03, "cosine")
        assert train_args.weight_decay == 0.0 and data_args.max_seq_len == 2048
    stage1 = _parse("llava-1.5-7b/stage1_pretrain.yaml")
    assert stage1[0].lm_mode == "frozen" and stage1[2].learning_rate == 1e-3 and _global_batch("llava-1.5-7b/stage1_pretrain.yaml") == 256
    full = _parse("llava-1.5-7b/stage2_finetune.yaml")
    assert full[0].lm_mode == "full" and full[2].learning_rate == 2e-5 and _global_batch("llava-1.5-7b/stage2_finetune.yaml") == 128
    assert full[2].init_from == stage1[2].output_dir + "/epoch-0"
    lora = _parse("llava-1.5-7b/stage2_finetune_lora.yaml")
    assert (lora[0].lang_lora_dim, lora[0].lang_lora_alpha, lora[2].learning_rate, lora[2].projector_learning_rate) == (128, 256, 2e-4, 2e-5)


def test_full_stage_2_fits_the_gpus_its_header_names():
    """The published set-up (8 x 80 GB, ZeRO-3, checkpointing, 16 x 2048 tokens per GPU) fits by mmtrain.memory's estimate."""
    model_args, data_args, train_args = _parse("llava-1.5-7b/stage2_finetune.yaml")
    setup = MemorySetup(
        zero_stage=3, num_gpus=8, micro_batch=train_args.per_device_train_batch_size, seq_len=data_args.max_seq_len,
        gradient_checkpointing=train_args.gradient_checkpointing,
    )
    assert estimate(model_args, setup).total < 75 * GiB


# --------------------------------------------------------------------------------------
# Stage 1 -> stage 2 on the tiny presets, through accelerate launch
# --------------------------------------------------------------------------------------


def _final_eval(out) -> dict:
    return [r for r in metrics(out) if r["split"] == "eval"][-1]


@pytest.fixture(scope="module")
def stages(data_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    one, two = root / "stage1", root / "stage2"
    first = launch(
        ["--config", str(RECIPES / "tiny/stage1_pretrain.yaml"), "--output_dir", str(one), "--data_path", str(data_path)],
        config="single_process.yaml", timeout=1800,
    )
    second = launch(
        [
            "--config", str(RECIPES / "tiny/stage2_finetune.yaml"), "--output_dir", str(two), "--data_path", str(data_path),
            "--init_from", str(one / "epoch-0"),
        ],
        config="single_process.yaml", timeout=1800,
    )
    return {"one": one, "two": two, "log_one": first.stdout + first.stderr, "log_two": second.stdout + second.stderr}


def test_stage_2_from_stage_1_beats_stage_1(stages):
    one, two = _final_eval(stages["one"]), _final_eval(stages["two"])
    assert two["exact_match"] > one["exact_match"] + 0.2, (one, two)
    assert two["loss"] < one["loss"]
    log = stages["log_two"]
    assert re.search(r"--init_from \S+epoch-0 \(export\): took projector: 4 tensors, [\d,]+ values; new_rows: 1 tensor, 384 values", log)


def test_per_component_rates_reach_the_optimizer(stages):
    """--projector_learning_rate 1e-3 beside --learning_rate 2e-3: the two groups' logged rates keep that ratio all the way."""
    train = [r for r in metrics(stages["two"]) if r["split"] == "train"]
    assert train and all(r["lr_projector_decay"] == pytest.approx(r["lr_decay"] / 2) for r in train)
    assert "projector_decay: 2 tensors, lr 0.001, wd 0" in stages["log_two"]
    assert "language model: LoRA rank 16" in stages["log_two"] and "language model: frozen" in stages["log_one"]


def test_init_from_a_checkpoint_takes_the_same_tensors(stages, tiny_args):
    """A checkpoint holds the same projector as the export written at the same step."""
    from mmtrain.model import build_model
    from mmtrain.training.init_from import check_source, load_parts

    checkpoint = sorted((stages["one"] / "checkpoints").iterdir())[-1]
    config = tiny_args(lm_model_name_or_path="tiny-llama", vision_model_name_or_path="tiny-clip")
    source = check_source(str(checkpoint), config, ["projector", "new_rows"])
    built = build_model(config)
    load_parts(built.model, source)
    exported = load_file(stages["one"] / "epoch-0" / "projector.safetensors")
    for key, value in exported.items():
        torch.testing.assert_close(built.model.projector.state_dict()[key], value)


def test_init_from_another_projector_is_refused_before_weights(stages, data_path):
    """The command line's path: another projector kind, its tensors and the setting named in one line, exit status 2."""
    proc = _train(
        common_flags({"tiny-llama": "tiny-llama", "tiny-clip": "tiny-clip"}, data_path, output_dir=stages["two"].parent / "bad",
                     lang_lora_dim=0, vis_proj="baseline", init_from=stages["one"] / "epoch-0")
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: --init_from") and "does not fit this model: projector: tensors differ" in error
    assert "--vis_proj 'mlp' there, 'baseline' here" in error
    assert "model components" not in proc.stdout + proc.stderr  # refused before the model was built


def test_init_from_another_width_names_each_tensor(stages):
    """A 7B-wide LM (built on the meta device only): the projector's output and the new rows do not fit, each named."""
    from mmtrain.args import ModelArguments
    from mmtrain.training.init_from import check_source

    wide = ModelArguments(lm_model_name_or_path="llama-2-7b", vision_model_name_or_path="tiny-clip", lang_lora_dim=0)
    with pytest.raises(ConfigError) as caught:
        check_source(str(stages["one"] / "epoch-0"), wide, ["projector", "new_rows"])
    message = str(caught.value)
    assert "projector: projector.linear_1.weight is [128, 64] in the export, [4096, 64] here" in message
    assert "new_rows: language_model.model.embed_tokens.new_rows is [3, 128] in the export, [3, 4096] here" in message


def test_init_from_an_export_cannot_give_adapters(stages, tiny_args):
    from mmtrain.training.init_from import check_source

    with pytest.raises(ConfigError, match="is an export, where LoRA is fused"):
        check_source(str(stages["one"] / "epoch-0"), tiny_args(lang_lora_dim=4), ["lm_lora"])


def test_stage_2_whole_lm_at_zero3_with_offload_on_two_processes(stages, model_folders, data_path, tmp_path):
    """--lm_training full from stage 1's export, partitioned and offloaded: every LM weight trains and the export holds them."""
    out = tmp_path / "full"
    flags = common_flags(
        model_folders, data_path, output_dir=out, lang_lora_dim=0, lm_training="full", init_from=stages["one"] / "epoch-0",
        eval_generate=0,
    )
    proc = launch(flags, config="zero3_offload.yaml", num_processes=2, timeout=1800)
    log = proc.stdout + proc.stderr
    assert "(export): took projector: 4 tensors" in log and "language model: every weight trains" in log
    manifest = json.loads(next((out / "checkpoints").iterdir()).joinpath("manifest.json").read_text())
    assert manifest["zero_stage"] == 3
    assert "language_model.model.layers.0.mlp.down_proj.weight" in manifest["trainable_parameters"]
    assert "language_model.lm_head.weight" in manifest["trainable_parameters"]
    before = load_file(Path(model_folders["tiny-llama"]) / "model.safetensors")
    after = load_file(out / "epoch-0" / "language_model" / "model.safetensors")
    for key in ("model.layers.0.mlp.down_proj.weight", "model.layers.3.self_attn.o_proj.weight", "lm_head.weight"):
        assert after[key].shape[1] == before[key].shape[1]
        assert not torch.equal(after[key][: before[key].shape[0]].float(), before[key].float()), f"{key} did not train"
    losses = [r["loss"] for r in metrics(out) if r["split"] == "train"]
    assert losses[-1] < losses[0]
    # its ZeRO-3 checkpoint (partitioned fp32 master weights) gives --init_from the projector the export holds
    from mmtrain.model import build_model
    from mmtrain.training.init_from import check_source, load_parts

    config = ModelArguments(lm_model_name_or_path=model_folders["tiny-llama"], vision_model_name_or_path=model_folders["tiny-clip"], lang_lora_dim=0)
    checkpoint = sorted((out / "checkpoints").iterdir())[-1]
    built = build_model(config)
    load_parts(built.model, check_source(str(checkpoint), config, ["projector", "new_rows"]))
    for key, value in load_file(out / "epoch-0" / "projector.safetensors").items():
        torch.testing.assert_close(built.model.projector.state_dict()[key], value.float(), rtol=1e-2, atol=1e-2)


def test_init_from_a_checkpoint_with_its_adapters_is_the_exported_model(stages):
    """Stage 2's last checkpoint, adapters included, in a fresh model computes what stage 2's export computes."""
    from mmtrain.model import build_model
    from mmtrain.model.pretrained import load_pretrained
    from mmtrain.training.init_from import check_source, load_parts

    from tests.model.test_pretrained import _inputs

    model_args, _, _ = parse_args(["--config", str(RECIPES / "tiny/stage2_finetune.yaml")])
    checkpoint = sorted((stages["two"] / "checkpoints").iterdir())[-1]
    built = build_model(model_args)
    lines = load_parts(built.model, check_source(str(checkpoint), model_args, ["projector", "new_rows", "lm_lora"]))
    assert lines[-1].startswith("lm_lora: 56 tensors")  # A and B of 7 Linear layers in each of 4 decoder layers
    exported = load_pretrained(str(stages["two"] / "epoch-0"))
    ids, pixels = _inputs(built)
    with torch.no_grad():
        expected = exported.model(ids, pixel_values=pixels, return_logits=True).logits
        got = built.model.eval()(ids, pixel_values=pixels, return_logits=True).logits
    torch.testing.assert_close(got[..., : expected.shape[-1]], expected, rtol=1e-4, atol=1e-4)
