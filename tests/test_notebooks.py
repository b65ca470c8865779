"""Every notebook under notebooks/ runs top to bottom, and is committed without outputs.

CI runs each in its small mode (``MMTRAIN_NOTEBOOK_SMALL=1``), which the notebooks state
the time of, as they state the time of the mode they open in.
"""

import glob
import os
import re

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


# Files of the repository a notebook's text names, as `path` (a trailing / for a folder).
_REPO_PATH = re.compile(r"`(?:\.\./)?((?:mmtrain|benchmarks|accelerate_configs|notebooks|tests|scripts)/[\w./-]*)`")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_cites_nothing_outside_the_repository(path):
    nb = nbformat.read(path, as_version=4)
    text = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "markdown")
    named = _REPO_PATH.findall(text)
    missing = [p for p in named if not os.path.exists(os.path.join(REPO, p))]
    assert not missing, f"{os.path.basename(path)} names files the repository does not have: {missing}"
    # documents that were never part of the repository, cited as if they were
    assert not re.search(r"design (page|doc)", text, re.I), f"{os.path.basename(path)} cites a design page that is not in the repository"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_says_how_long_it_takes(path):
    intro = nbformat.read(path, as_version=4).cells[0].source
    assert re.search(r"\babout (\d+ s|half a minute|\d+ minutes?)\b", intro), f"{os.path.basename(path)}: the first cell says nothing of its run time"
    assert "MMTRAIN_NOTEBOOK_SMALL" in intro, f"{os.path.basename(path)}: the first cell does not name the mode CI runs"


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
