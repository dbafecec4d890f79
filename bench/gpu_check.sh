#!/usr/bin/env bash
# The GPU acceptance run (issue 13): CUDA tests + training / evaluation / indexing / data figures next to
# their goals, written to OUT/gpu_report.json and OUT/gpu_report.md in <= 8 minutes.
#
#   bash bench/gpu_check.sh [OUT] [--dry-run] [--only SECTIONS]     (make gpu-check = bash bench/gpu_check.sh)
#
# Runs lgur from src/ with the python that has torch (nothing is installed or downloaded): $PYTHON if
# set, else the repository's .venv if it exists, else python3. Works from a bare checkout.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu-check: $PY cannot import torch; set PYTHON=/path/to/python (nothing is installed here)" >&2
    exit 2
fi
OUT=gpu_check_out
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then OUT="$1"; shift; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}" TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "gpu-check: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())')), output $OUT"
exec "$PY" bench/gpu_check.py "$OUT" "$@"
