#!/usr/bin/env bash
# Thin wrapper: run the comparison with the project's venv; every argument goes to compare.py.
#   bash benchmarks/compare.sh --quick
#   nohup bash benchmarks/compare.sh > benchmarks/results/compare.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
mkdir -p benchmarks/results
exec python benchmarks/compare.py "$@"
