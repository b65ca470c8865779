"""``python -m mmtrain.export``: exit codes and messages of the command line.

What the LLaVA folder computes (the same logits, loadable without mmtrain) is tested
with the exports in tests/model/test_pretrained.py.
"""

from __future__ import annotations

import json

import pytest

from mmtrain.export import main


@pytest.fixture
def export(tmp_path, tiny_args):
    """export(**model_flags) -> an mmtrain export folder of a tiny model."""
    from mmtrain.model import build_model
    from mmtrain.model.pretrained import save_pretrained

    def make(**kw):
        args = tiny_args(lang_lora_dim=4, **kw)
        built = build_model(args)
        folder = tmp_path / f"export-{len(list(tmp_path.glob('export-*')))}"
        save_pretrained(str(folder), built.model.state_dict(), built.model, built.tokenizer, built.image_processor, args)
        return folder

    return make


def _one_error_line(err: str) -> str:
    """The error message: one line, the last one (loading may have drawn progress bars before it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def test_cli_writes_a_llava_folder(export, tmp_path, capsys):
    folder = export(vis_proj="mlp")
    out = tmp_path / "llava"
    assert main(["--model", str(folder), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava"
    assert (out / "processor_config.json").is_file() or (out / "preprocessor_config.json").is_file()
    assert list(out.glob("*.safetensors"))


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (dict(vis_proj="perceiver"), "the 'perceiver' projector has no exact LLaVA equivalent"),
        (dict(vis_proj="mlp", enable_mmca_attention=True), "trained with MMCA attention"),
    ],
)
def test_cli_refuses_models_llava_cannot_run_in_one_line(export, tmp_path, capsys, flags, says):
    folder = export(**flags)
    out = tmp_path / "llava"
    assert main(["--model", str(folder), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert says in line and str(folder) in line
    assert captured.out == "" and not out.exists()


@pytest.mark.parametrize("kind", ["empty folder", "missing folder", "a model folder"])
def test_cli_names_a_folder_that_is_not_an_export(tmp_path, capsys, model_folders, kind):
    if kind == "a model folder":
        folder = model_folders["tiny-llama"]  # a Hugging Face folder, not an mmtrain export
    else:
        folder = tmp_path / kind.split()[0]
        if kind == "empty folder":
            folder.mkdir()
    assert main(["--model", str(folder), "--out", str(tmp_path / "llava")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(folder) in line and "export" in line
    assert not (tmp_path / "llava").exists()
