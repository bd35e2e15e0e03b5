"""The runtimes the project exports to and the Python package each needs: `require(runtime)` imports
it or raises RuntimeMissingError naming what to install. Apart from runtimes.py (the sessions) so
that each runtime's exporter (executorch.py) can require its package without importing the sessions.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from ..errors import ExportError, one_line

__all__ = ["RUNTIMES", "PACKAGES", "SUFFIX", "RuntimeMissingError", "require"]

RUNTIMES = ("ort", "openvino", "executorch")
PACKAGES = {"ort": "onnxruntime", "openvino": "openvino", "executorch": "executorch"}
SUFFIX = {"ort": ".onnx", "openvino": ".xml", "executorch": ".pte"}
# Folders (beside the venv's own site-packages) that hold optional packages kept out of the main environment.
EXTRA_DIRS = {"executorch": ("executorch-extra", "torchao-extra")}


class RuntimeMissingError(ExportError):
    """The runtime's Python package is not installed (the message names it)."""


def require(runtime: str):
    """The runtime's Python module, imported; RuntimeMissingError naming the package when it is absent."""
    if runtime not in RUNTIMES:
        raise ExportError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    for folder in EXTRA_DIRS.get(runtime, ()):
        extra = Path(sys.prefix) / folder
        if extra.is_dir() and str(extra) not in sys.path:
            sys.path.append(str(extra))
    module = PACKAGES[runtime]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = ("bash scripts/install.sh (it installs executorch==1.5.1 into .venv/executorch-extra)"
                if runtime == "executorch" else f"pip install {module}")
        raise RuntimeMissingError(f"runtime {runtime!r} needs the Python package {module!r}, which does not import "
                                  f"here ({one_line(exc, 120)}); install it: {hint}") from exc
