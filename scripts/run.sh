#!/usr/bin/env bash
# Set up a virtual environment (once) and run the embedded default or the tests.
#   bash scripts/run.sh train [flags]   # the embedded default run (or any training flags)
#   bash scripts/run.sh test [args]     # the whole test suite
# MMTRAIN_VENV picks the environment folder (default .venv); MMTRAIN_TORCH the torch
# requirement installed first (default torch==2.13.0; on a CPU-only machine point pip at
# a CPU build to avoid downloading CUDA libraries).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MMTRAIN_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import mmtrain, torch, deepspeed, pytest" >/dev/null 2>&1; then
    "$py" -m pip install --quiet --upgrade pip
    "$py" -m pip install --quiet "${MMTRAIN_TORCH:-torch==2.13.0}"
    "$py" -m pip install --quiet -e ".[dev]"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
what="${1:-}"
shift || true
case "$what" in
    train)
        exec "$py" -m mmtrain.train "$@"
        ;;
    test)
        set +e
        "$py" -m pytest -q "$@"
        rc=$?
        # pytest's 5 means "no tests collected": a selection that matched nothing is not a failure
        [ "$rc" -eq 5 ] && rc=0
        exit "$rc"
        ;;
    *)
        echo "usage: bash scripts/run.sh train [flags] | test [pytest args]" >&2
        exit 2
        ;;
esac
