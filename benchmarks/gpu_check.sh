#!/usr/bin/env bash
# Every GPU check chapter 10 needs, in one run of under 8 minutes on one H100 or H200:
#
#   bash benchmarks/gpu_check.sh [--quick] [--budget-s 390] [--repeats 7] [--iters 3]
#
# Runs benchmarks/gpu_check.py (see its docstring for the checks) and writes
# benchmarks/results/gpu/gpu_check_<device>.json. Installs nothing: it uses the first Python
# whose torch sees a CUDA device, trying .venv/bin/python, then python3 and python from PATH (a
# GPU machine may have torch and triton preinstalled and no .venv). With no CUDA device anywhere
# it says so and exits 0. A hard limit (GPU_CHECK_LIMIT_S, default 470 s) interrupts the run
# if its own time budget is overrun; what was measured by then is still written.
set -euo pipefail
cd "$(dirname "$0")/.."

candidates=(.venv/bin/python python3 python)
cuda_probe='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'
PY=""
for py in "${candidates[@]}"; do  # first choice: a Python whose torch sees a GPU
  if command -v "$py" >/dev/null 2>&1 && "$py" -c "$cuda_probe" 2>/dev/null; then
    PY=$py
    break
  fi
done
if [[ -z $PY ]]; then  # no GPU: any Python with torch, to print the script's own message
  for py in "${candidates[@]}"; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import torch' 2>/dev/null; then
      PY=$py
      break
    fi
  done
fi
if [[ -z $PY ]]; then
  echo "gpu_check: no Python with torch found (tried ${candidates[*]})" >&2
  exit 1
fi

unset TRITON_INTERPRET  # on a GPU the kernels are compiled, not interpreted
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GPU_CHECK_COMMAND="bash benchmarks/gpu_check.sh${*:+ $*}"
echo "gpu_check: $("$PY" -c 'import sys; print(sys.executable)')"
limit=${GPU_CHECK_LIMIT_S:-470}
if command -v timeout >/dev/null 2>&1; then
  # SIGINT first (the script writes what it has), SIGKILL 20 s later
  exec timeout --signal=INT --kill-after=20 "$limit" "$PY" benchmarks/gpu_check.py "$@"
fi
exec "$PY" benchmarks/gpu_check.py "$@"
