#!/usr/bin/env bash
# The one command for a fresh machine: install (once), build the demo model (once), start a
# 1 prefill + 1 decode cluster on 127.0.0.1 with the scheduler on :9000, ask it one question,
# and keep serving until Ctrl-C. Extra arguments go to `pdserve up` (e.g. --once to exit after
# the answer, --port 9100, --prefill 2).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/scripts/setup.sh"
venv="${PDSERVE_VENV:-$repo/.venv}"
exec "$venv/bin/pdserve" up --demo --ask "What is the capital of France?" "$@"
