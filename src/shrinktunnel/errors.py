"""Typed errors. Every message names the problem, the offending value and the fix.

The CLI turns any `ShrinkError` into one line on stderr and exit code 2; anything else is a bug.
Exit codes of `shrink` (docs/cli.md): 0 done, 2 an error below (or a usage error), 3 `shrink auto`
found no candidate that meets the budget (its artifact and report are still written, marked so).
"""


class ShrinkError(Exception):
    """Base of every error shrinktunnel raises on purpose."""


class ConfigError(ShrinkError, ValueError):
    """A config, recipe or option is invalid (unknown key, value out of range, wrong type)."""


class DataError(ShrinkError, ValueError):
    """The data cannot be used: empty, wrong shape, wrong type, or the model fails on it."""


class ModelError(ShrinkError, ValueError):
    """The model cannot be loaded, built or run."""


class ArtifactError(ShrinkError, OSError):
    """An artifact directory is missing, incomplete, corrupted or of an unknown version."""


class UntrustedCodeError(ArtifactError):
    """Loading an artifact would run code its manifest names (`model.ref`), and the caller has not
    consented (`model=` / `trust_code=True`; `--model REF` / `--trust-model-code`)."""

    def __init__(self, ref: str, message: str) -> None:
        super().__init__(message)
        self.ref = ref


class ExportError(ShrinkError, RuntimeError):
    """Export to ONNX or running the exported model failed."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: message` of an exception on one line (messages of YAML parsers, factories and torch
    often span many lines; the command line promises one)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
