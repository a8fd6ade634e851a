#!/usr/bin/env bash
# One command for a fresh machine: set up (idempotent) and run every test tier.
#   bash scripts/test.sh                 # unit + integration + end-to-end (real vLLM, minutes)
#   bash scripts/test.sh -m unit         # extra args go to pytest (select a tier, -k, -x, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${PDSERVE_VENV:-.venv}/bin/activate"
python -m pdserve model demo >/dev/null   # build the demo model once (tests share it)
set +e
python -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
