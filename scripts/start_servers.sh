#!/usr/bin/env bash
# Drop-in for AscendCloud-LLM's PD_separate start_servers.sh: start this host's role daemon.
#
# Same interface as the closed script:
#   GLOBAL_RANK_TABLE_FILE_PATH  global ranktable (global_ranktable_merge.json or global_ranktable_<ip>.json)
#   RANK_TABLE_FILE_PATH         this daemon's local ranktable (local_ranktable_<ip>_<devices>.json,
#                                or local_ranktable_<ip>_host.json for the scheduler)
#   NODE_PORTS                   scheduler only: the instances' --port values, prefill first, then decode
#   USE_OPENAI                   scheduler only: 1 (default) OpenAI API, 0 vLLM's /generate
#   "$@"                         the vLLM flags (--model --port --max-model-len --tensor-parallel-size ...)
#
# The role (scheduler, prefill or decode instance) comes from the ranktables. `exec` makes the
# daemon this process, so SIGTERM/SIGINT from the operator or the orchestrator reach it directly.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

: "${GLOBAL_RANK_TABLE_FILE_PATH:?export GLOBAL_RANK_TABLE_FILE_PATH=/path/to/global_ranktable_merge.json}"
: "${RANK_TABLE_FILE_PATH:?export RANK_TABLE_FILE_PATH=/path/to/local_ranktable_<ip>_<devices>.json}"
export GLOBAL_RANK_TABLE_FILE_PATH RANK_TABLE_FILE_PATH

if [[ -n "${PDSERVE_BIN:-}" ]]; then
    pdserve="$PDSERVE_BIN"
elif [[ -x "$repo/.venv/bin/pdserve" ]]; then
    pdserve="$repo/.venv/bin/pdserve"
elif command -v pdserve >/dev/null 2>&1; then
    pdserve="$(command -v pdserve)"
else
    echo "start_servers.sh: pdserve not found: run scripts/setup.sh (creates $repo/.venv) or pip install pdserve" >&2
    exit 127
fi

exec "$pdserve" serve "$@"
