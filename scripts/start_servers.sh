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

usage() {
    cat <<'EOF'
usage: scripts/start_servers.sh [pdserve serve flags] [vLLM flags...]

Start this host's role daemon (`pdserve serve`): the scheduler, a prefill or a decode instance,
as the ranktables say. It reads:
  GLOBAL_RANK_TABLE_FILE_PATH  the global ranktable (required)
  RANK_TABLE_FILE_PATH         this daemon's local ranktable (required; ..._host.json = scheduler)
  NODE_PORTS                   scheduler only: the instances' ports, prefill first, then decode
  USE_OPENAI                   scheduler only: 1 (default) OpenAI API, 0 vLLM's /generate
  PDSERVE_BIN                  which pdserve to run (default <repo>/.venv/bin/pdserve, then PATH)
Arguments: vLLM's flags (--model --port --max-model-len ...), passed through unchanged, plus the
daemon's own (--kv-connector, --drain-seconds, --dry-run, ...: see `pdserve serve --help`).

example:
  export GLOBAL_RANK_TABLE_FILE_PATH=global_ranktable_merge.json
  export RANK_TABLE_FILE_PATH=local_ranktable_10.0.0.18_45.json
  scripts/start_servers.sh --model /models/qwen --port 8001 --max-model-len 4096
EOF
}

for arg in "$@"; do  # help before the checks below, which need the ranktables
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
        usage
        exit 0
    fi
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

need() {  # one readable line, not bash's "line N: VAR: ..." from ${VAR:?}
    if [[ -z "${!1:-}" ]]; then
        echo "start_servers.sh: $1 is not set: export $1=$2 (see --help)" >&2
        exit 2
    fi
}
need GLOBAL_RANK_TABLE_FILE_PATH /path/to/global_ranktable_merge.json
need RANK_TABLE_FILE_PATH "/path/to/local_ranktable_<ip>_<devices>.json"
export GLOBAL_RANK_TABLE_FILE_PATH RANK_TABLE_FILE_PATH

if [[ -n "${PDSERVE_BIN:-}" ]]; then
    pdserve="$PDSERVE_BIN"
    if [[ ! -x "$pdserve" || -d "$pdserve" ]]; then
        echo "start_servers.sh: PDSERVE_BIN=$PDSERVE_BIN is not an executable file: point it at the pdserve" \
             "command (e.g. $repo/.venv/bin/pdserve) or unset it" >&2
        exit 2
    fi
elif [[ -x "$repo/.venv/bin/pdserve" ]]; then
    pdserve="$repo/.venv/bin/pdserve"
elif command -v pdserve >/dev/null 2>&1; then
    pdserve="$(command -v pdserve)"
else
    echo "start_servers.sh: pdserve not found: run scripts/setup.sh (creates $repo/.venv) or pip install pdserve" >&2
    exit 127
fi

exec "$pdserve" serve "$@"
