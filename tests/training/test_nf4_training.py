"""``--quantize_base nf4`` through the real trainer on a CPU: trains, resumes exactly, and exports a model that reloads.

bitsandbytes' CPU backend runs NF4 products forward and backward, so the whole path
(the probe, the conversion, the loop, a checkpoint, a resume, the merged export) runs
here; without bitsandbytes these skip, and the GPU tier (tests/gpu/test_tier.py) runs
the same path with DeepSpeed, compilation and bfloat16.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("bitsandbytes")

from tests.training.conftest import REPO, common_flags, metrics, train_losses  # noqa: E402


def _train(flags):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "mmtrain.train", *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _export_eval_loss(folder, out) -> tuple[float, int]:
    """The eval loss of the reloaded export over the run's eval split (fp32, LoRA merged)."""
    from mmtrain.args import DataArguments
    from mmtrain.data import Collator, build_datasets
    from mmtrain.model.pretrained import load_pretrained

    run = json.loads((out / "run_config.json").read_text())
    built = load_pretrained(str(folder), dtype=torch.float32)
    data = build_datasets(DataArguments(**run["data_args"]), built.tokenizer, built.image_processor, built.image_tokens, seed=run["train_args"]["seed"])
    collate = Collator(built.tokenizer.pad_token_id, 1)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data.eval), 8):
            batch = collate([data.eval[i] for i in range(start, min(start + 8, len(data.eval)))])
            o = built.model(**batch)
            total += float(o.loss_sum_per_sample.double().sum())
            tokens += int(o.label_tokens_per_sample.sum())
    return total / tokens, tokens


def test_nf4_base_trains_resumes_and_exports_merged_weights(tmp_path, model_folders, data_path):
    out = tmp_path / "run"
    flags = common_flags(model_folders, data_path, output_dir=out, synthetic_num_samples=32, eval_generate=0, save_steps=3,
                         save_total_limit=5, quantize_base="nf4", quantize_vision="nf4")
    proc = _train(flags)
    assert "nf4 base (--quantize_base nf4): 28 frozen Linear layers hold 4-bit NF4 weights" in proc.stderr  # 4 layers x 7
    assert "nf4 vision (--quantize_vision nf4):" in proc.stderr
    reference = train_losses(out)
    assert len(reference) == 8 and all(v == v for v in reference.values())

    # A resume from step 3's checkpoint (the run's later state removed, as after a kill)
    # logs the uninterrupted run's losses: the 4-bit base is rebuilt from the source folder
    # and quantised the same way, the adapters and optimizer come from the checkpoint.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns("step-0000000[4-9]", "epoch-*"))
    lines = [line for line in (resumed / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 3]
    (resumed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    _train([*[f if f != str(out) else str(resumed) for f in flags], "--resume_from_checkpoint", "latest"])
    after = {m["step"]: m["loss"] for m in metrics(resumed) if m["split"] == "train" and m["step"] > 3}
    assert sorted(after) == [4, 5, 6, 7, 8]
    for step, loss in after.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), (step, loss, reference[step])

    # The export holds full-precision weights with LoRA merged into the dequantised base:
    # reloaded with load_pretrained it gives the eval loss the 4-bit model logged. On a CPU
    # both compute in fp32 with the same dequantised weights, so only summation order differs.
    logged = [m for m in metrics(out) if m["split"] == "eval"][-1]
    loss, tokens = _export_eval_loss(out / "epoch-0", out)
    assert tokens == logged["label_tokens"]
    assert loss == pytest.approx(logged["loss"], rel=1e-4), (loss, logged["loss"])
