"""GPU tier row: a run started from a transformers LLaVA folder (``--vlm_name_or_path``).

A tiny LLaVA folder written by transformers is imported, trained with LoRA on one GPU
(``accelerate launch`` with the zero2 config, the chat template the folder carries),
and its epoch export checked as the tier checks every export: reloaded, it gives the
training run's eval loss. Exported again as LLaVA, plain transformers on CUDA, prompted
through the exported processor's chat template, gives mmtrain's logits and greedy answer.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.gpu.test_tier import DEVICE, REPO, Row, assert_export_reproduces_training, assert_trained, launch, record  # noqa: F401
from tests.llava_folders import plain_transformers_generate, write_tiny_llava

ROW = Row("zero2", ("llava_import", "lora", "chat"), llava=True)


def _flags(folder: str, data_path, out) -> list[str]:
    values = dict(
        vlm_name_or_path=folder,
        output_dir=out,
        data_path=data_path,
        template="chat",
        lang_lora_dim=4,
        synthetic_num_samples=160,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        pad_to_multiple_of=8,
        logging_steps=1,
        eval_generate=4,
        max_new_tokens=4,
        num_train_epochs=1,
        learning_rate=1e-3,
    )
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


@pytest.mark.parametrize("r", [pytest.param(ROW, id=ROW.name)])
def test_llava_import(r, data_path, tmp_path, record):  # noqa: F811  (record: the tier's fixture)
    from mmtrain.model.generation import SamplingOptions, generate
    from mmtrain.model.pretrained import load_pretrained

    record(r)
    folder = write_tiny_llava(tmp_path / "tiny-llava")
    out = tmp_path / "run"
    launch(_flags(folder, data_path, out), out=out, **r.launch_options())
    assert_trained(out)
    export = assert_export_reproduces_training(out, r)

    llava = tmp_path / "llava"
    proc = subprocess.run([sys.executable, "-m", "mmtrain.export", "--model", str(export), "--out", str(llava)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokenise differently" not in proc.stderr, proc.stderr[-3000:]
    generated = plain_transformers_generate(tmp_path, llava, device=DEVICE)[str(llava)]
    outputs = torch.load(f"{llava}.outputs.pt")
    built = load_pretrained(str(export), dtype=torch.float32, device=DEVICE)
    ids = torch.tensor(generated["input_ids"], device=DEVICE)
    pixels = outputs["pixel_values"].to(DEVICE)
    with torch.no_grad():
        logits = built.model(ids[None], pixel_values=pixels, return_logits=True).logits[0].cpu()
    torch.testing.assert_close(outputs["logits"], logits, rtol=1e-3, atol=1e-3)
    tok = built.tokenizer
    ours = generate(built.model, [ids], [pixels], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    options=SamplingOptions(max_new_tokens=8))[0]
    assert generated["new"][: len(ours)] == ours, (generated["new"], ours)
