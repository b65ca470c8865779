"""``--fp8_base`` through the real trainer: trains, checkpoints, and exports the original weights.

The trainer refuses float8 without float8 tensor cores; torch's CPU ``_scaled_mm`` computes
the same numbers (slowly), so this run lifts only that device check to follow the whole
path on CPU. The GPU tier (tests/gpu/test_tier.py) runs it for real.
"""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mmtrain.model import fp8

from tests.training.conftest import CONFIGS, REPO, _free_port, common_flags, metrics

# the trainer's own entry point, with the float8 device check answering "float8 runs here"
RUN = """import sys
sys.path.insert(0, {repo!r})
from mmtrain.model import fp8
fp8.float8_matmul_problem = lambda device: None
from mmtrain.train import cli
sys.exit(cli())
"""


def _weights(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


@pytest.mark.skipif(not fp8.float8_row_wise_runs("cpu"), reason=f"torch {torch.__version__}'s CPU _scaled_mm takes no row-wise scales")
@pytest.mark.parametrize("config", [None, "zero2.yaml"], ids=["python", "zero2"])
def test_fp8_base_trains_and_exports_the_original_weights(tmp_path, model_folders, data_path, config):
    out = tmp_path / "run"
    script = tmp_path / "train_fp8.py"
    script.write_text(RUN.format(repo=str(REPO)))
    # LoRA on attention only: the MLP's frozen Linears are converted too, and export unchanged.
    flags = common_flags(model_folders, data_path, output_dir=out, synthetic_num_samples=32, eval_generate=0, lang_lora_dim=4,
                         lang_lora_module_name="self_attn")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script)]
    if config:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config), "--num_processes", "1",
               "--num_machines", "1", "--main_process_port", str(_free_port()), str(script)]
    proc = subprocess.run([*cmd, *flags, "--fp8_base", "true", "--fp8_vision", "true"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "float8 base (--fp8_base): 28 frozen Linear layers hold float8 weights" in proc.stderr
    assert "float8 vision (--fp8_vision):" in proc.stderr
    losses = [m["loss"] for m in metrics(out) if m["split"] == "train"]
    assert losses and all(v == v for v in losses)

    # The export holds the original weights (in the run's frozen dtype: fp32 here, bf16
    # under DeepSpeed), not their float8 copies, which differ by a few percent.
    source = _weights(model_folders["tiny-llama"])
    exported = _weights(out / "epoch-0" / "language_model")
    for layer in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.{proj}.weight"
            assert torch.equal(exported[key], source[key].to(exported[key].dtype)), key
    adapted = "model.layers.1.self_attn.q_proj.weight"
    delta = exported[adapted].double() - source[adapted].double()
    assert delta.abs().max() > 0  # LoRA merged into the attention's originals
    vision_source, vision_export = _weights(model_folders["tiny-clip"]), _weights(out / "epoch-0" / "vision_encoder")
    for key, value in vision_export.items():  # the frozen tower, exported from its originals
        assert torch.equal(value, vision_source[key].to(value.dtype)), key
    # Checkpoints keep trainable parameters only: neither the originals nor the float8 weights.
    checkpoint = next((out / "checkpoints").iterdir())
    read = []
    for path in checkpoint.rglob("*"):
        if path.suffix in (".pt", ".bin", ".safetensors") and "optim" not in path.name and "portable" not in path.name:
            state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=False)
            state = state.get("module") or state if isinstance(state, dict) else {}
            names = [k for k, v in state.items() if torch.is_tensor(v)]
            if any(".lora_" in k for k in names):  # a file of model weights
                read.append(path.name)
                assert not [k for k in names if ".base_layer.weight" in k or "weight_scale" in k or ".mlp." in k], path
    assert read, "no model weights found in the checkpoint"
