"""Every notebook under notebooks/ runs top to bottom, and is committed without outputs."""

import glob
import os

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [k for k, cell in enumerate(nb.cells) if cell.cell_type == "code" and (cell.outputs or cell.execution_count)]
    assert not dirty, f"{os.path.basename(path)}: code cells {dirty} carry outputs; strip them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_runs_top_to_bottom(path):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "MPLBACKEND", "MMTRAIN_NOTEBOOK_SMALL")}
    os.environ.update(HF_HUB_OFFLINE="1", MPLBACKEND="Agg", MMTRAIN_NOTEBOOK_SMALL="1")
    try:
        NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": NOTEBOOK_DIR}}).execute()
    finally:
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
