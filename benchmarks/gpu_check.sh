#!/usr/bin/env bash
# The GPU check of issue 17 (benchmarks/gpu_check.py): under 8 minutes on one H100/H200, figures
# appended to benchmarks/RESULTS.md. `--dry-run` checks it on the CPU at tiny sizes (scratch file).
#   benchmarks/gpu_check.sh --original /path/to/guided-diffusion
#   benchmarks/gpu_check.sh --dry-run
# The Python script keeps its own budget (--budget, 420 s); `timeout` is the hard stop behind it.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout --signal=INT --kill-after=20 470 python benchmarks/gpu_check.py "$@"
