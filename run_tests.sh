#!/usr/bin/env bash
# The whole test suite on a fresh machine: creates/updates .venv (as run_all.sh does),
# then runs pytest over tests/ and nbval over the committed notebooks.
#   ./run_tests.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")"
./run_all.sh --setup-only --with-tests
export PYTHONHASHSEED=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
shopt -s nullglob
notebooks=(notebooks/[0-9][0-9]_*.ipynb)
nbval=()
[ ${#notebooks[@]} -gt 0 ] && nbval=(--nbval-lax "${notebooks[@]}")
exec .venv/bin/python -m pytest tests "${nbval[@]}" "$@"
