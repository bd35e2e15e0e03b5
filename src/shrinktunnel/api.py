"""The public functions: thin wrappers over the registry, the artifact and measurement."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from torch import nn

from .core import data as D
from .core.artifact import load_artifact, save_artifact
from .core.history import set_model_ref
from .core.recipe import load_recipe
from .core.registry import Context, report_sections
from .core.stage import run_stage
from .core.result import Result
from .errors import ConfigError, ModelError
from .measure import artifact_bytes, bits_per_weight, count_macs, count_weights, float_safetensors_bytes
from .quant.config import QuantConfig

__all__ = ["quantize", "prune", "cast", "cluster", "distill", "fuse", "decompose", "compress", "load", "save", "run_stage",
           "compile"]


def quantize(model: nn.Module, config: QuantConfig | dict | None = None, *, data: Any = None, progress: bool = True) -> nn.Module:
    """Return a NEW quantized model (post-training); `model` is not changed. `data`: calibration batches."""
    return run_stage(model, "quantize", config, Context(data=D.reiterable(data), progress=progress))


def prune(
    model: nn.Module,
    config: Any = None,
    *,
    data: Any = None,
    example_inputs: Any = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    train_step: Callable[[nn.Module, Any], None] | None = None,
    loss_fn: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
) -> nn.Module:
    """Return a NEW pruned model; `model` is not changed. The config's type picks the method:
    `st.ChannelPruneConfig` -> "prune_channels" (structured: layers rewritten to fewer channels),
    `st.PruneConfig` (or a dict / None) -> "prune" (unstructured sparsity). `data`: batches for
    importance scores and fine-tuning; `example_inputs`: one batch to trace the model with;
    `train_step(model, batch)`: your own training step, run instead of the built-in fine-tuning loop;
    `loss_fn(model, batch) -> loss`: the built-in loop's loss instead of cross-entropy."""
    from .core.config import Config
    from .core.registry import method_for_config

    # Looked up in the registry, so each pruning method works as soon as its package registers it.
    method = method_for_config(config).name if isinstance(config, Config) else "prune"
    ctx = Context(data=D.reiterable(data), example_inputs=example_inputs, eval_fn=eval_fn, progress=progress,
                  train_step=train_step, loss_fn=loss_fn)
    return run_stage(model, method, config, ctx)


def qat(model: nn.Module, config: Any = None, *, data: Any, eval_fn: Callable[[nn.Module], float] | None = None,
        progress: bool = True) -> nn.Module:
    """Return a NEW model trained with fake quantization on `data`, then converted to quantized layers
    (`st.QATConfig`); `model` is not changed. `data`: (inputs, target) batches (or any, with loss: mse_to_float)."""
    return run_stage(model, "qat", config, Context(data=D.reiterable(data), eval_fn=eval_fn, progress=progress))


def prepare_qat(model: nn.Module, config: Any = None, *, data: Any = None, progress: bool = True) -> nn.Module:
    """Return a NEW fake-quantized model to train with your own loop (`model` is not changed); `data`
    calibrates the initial activation ranges. Finish with `st.convert_qat`."""
    from .quant.qat import prepare

    return prepare(model, config, data=data, progress=progress)


def convert_qat(model: nn.Module) -> nn.Module:
    """Return a NEW model with the fake-quantized layers of a `prepare_qat` model converted to the
    quantized layers PTQ builds, recorded as a `qat` stage (ready for `st.save` and export)."""
    from .quant.qat import convert

    return convert(model)


def decompose(model: nn.Module, config: Any = None, *, data: Any = None, example_inputs: Any = None,
              progress: bool = True) -> nn.Module:
    """Return a NEW model with Linear / Conv layers replaced by low-rank chains (`st.DecomposeConfig`);
    `model` is not changed. `data`: a few batches to time layers and, with a budget, measure sensitivity
    (labelled batches for the config's fine_tune)."""
    ctx = Context(data=D.reiterable(data), example_inputs=example_inputs, progress=progress)
    return run_stage(model, "decompose", config, ctx)


def cluster(model: nn.Module, config: Any = None, *, data: Any = None, progress: bool = True) -> nn.Module:
    """Return a NEW model whose weights are shared through per-layer k-means codebooks
    (`st.ClusterConfig`); `model` is not changed. `data`: training batches, used only when the config
    asks to fine-tune the codebooks (`tune`)."""
    return run_stage(model, "cluster", config, Context(data=D.reiterable(data), progress=progress))


def cast(model: nn.Module, config: Any = None) -> nn.Module:
    """Return a NEW model whose Linear/Conv weights are stored as FP16, BF16 or FP8 (`st.CastConfig`)."""
    return run_stage(model, "cast", config, Context(progress=False))


def distill(student: nn.Module, teacher: nn.Module, data: Any, config: Any = None, *,
            eval_fn: Callable[[nn.Module], float] | None = None, progress: bool = True) -> nn.Module:
    """Return a NEW student distilled from `teacher` on `data` (`st.DistillConfig`); neither model is changed."""
    from .distillation import DistillConfig

    if not isinstance(teacher, nn.Module):
        raise ModelError(f"distill: the teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    cfg = DistillConfig.parse(config)
    if cfg.teacher != "original":
        raise ConfigError(f"distill: a teacher is passed and the config names another ({cfg.teacher!r}); "
                          "remove `teacher` from the config, or call st.compress with a recipe")
    return run_stage(student, "distill", cfg, Context(data=D.reiterable(data), eval_fn=eval_fn, progress=progress,
                                                      original=teacher))


def fuse(models: list[nn.Module], config: Any = None, *, data: Any = None, progress: bool = True) -> nn.Module:
    """Return a NEW model: the first model's trunk shared by one head per model, distilled from all of
    them on `data` (`st.FuseConfig`); it returns a tuple (or dict) of the task outputs."""
    from .fusion import FuseConfig, fuse_networks

    return fuse_networks(models, FuseConfig.parse(config), data, progress=progress)


def compress(
    model: nn.Module,
    recipe: Any,
    *,
    data: Any = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    example_inputs: Any = None,
    model_ref: str | None = None,
    progress: bool = True,
) -> Result:
    """Run every stage of `recipe` on a copy of `model`; return a Result with before/after metrics.
    `model` may also be a MODEL reference or a Hugging Face model directory, whose `data` may then be a
    list of strings (tokenized into windows by the directory's tokenizer; hf_input.text_batches).

    `model_ref` ("pkg.module:factory" or "file.py:factory") lets `st.load` rebuild the architecture
    without being handed the model; models from `shrinktunnel.assets` carry theirs already.
    """
    if isinstance(model, (str, os.PathLike)):  # a reference, or a Hugging Face model directory (hf_input)
        from .core.refs import load_model
        from .core.hf_input import is_hf_model_dir, text_batches

        if is_hf_model_dir(model) and isinstance(data, (list, tuple)) and data and all(isinstance(t, str) for t in data):
            data = text_batches(list(data), model)  # strings: windows of 512 tokens, at most 128
        model = load_model(str(model))
    if not isinstance(model, nn.Module):
        raise ModelError(f"compress expects a torch.nn.Module, got {type(model).__name__}")
    stages = load_recipe(recipe)
    data = D.reiterable(data)
    if model_ref is not None:
        set_model_ref(model, model_ref)
    # Everything runs on a copy in eval mode: running the caller's model (say, left in train mode)
    # would update its BatchNorm statistics.
    original = copy.deepcopy(model).eval()
    if data is not None:
        D.check_model_runs(original, data)
    ctx = Context(data=data, example_inputs=example_inputs, eval_fn=eval_fn, progress=progress, original=original)
    current = original
    for stage in stages:
        current = run_stage(current, stage.method, stage.config, ctx)
    if example_inputs is None and data is not None:
        example_inputs = next(D.batches(data))
    metrics = {"before": _measure(original, example_inputs, eval_fn),
               "after": _measure(current, example_inputs, eval_fn, artifact=True)}
    for section in report_sections():  # what methods declare (cluster: bits per weight per layer)
        if (figures := section.build(current)):
            metrics["after"][section.key] = figures
    return Result(current, metrics, ctx.warnings)


def _measure(model: nn.Module, example: Any, eval_fn, artifact: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"weights": count_weights(model)}
    if artifact:
        with tempfile.TemporaryDirectory() as d:
            out["bytes"] = artifact_bytes(save_artifact(model, Path(d) / "a"))
    else:
        out["bytes"] = float_safetensors_bytes(model)
    out["bits_per_weight"] = bits_per_weight(out["bytes"], out["weights"])
    if example is not None:
        inputs, _ = D.split(example)
        out["macs"] = count_macs(model, inputs)
    if eval_fn is not None:
        out["metric"] = float(eval_fn(model))
    return out


def load(path: str | os.PathLike, model: nn.Module | None = None, *, trust_code: bool = False,
         backend: str | None = None) -> nn.Module:
    """Rebuild the compressed model saved at `path` (a new module; no pickle, no code the artifact names
    runs). `model`: the original architecture (copied, never changed). Without it, the architecture
    comes from shrinktunnel's own assets, a Hugging Face config.json or another artifact; an artifact
    that names other code (`pkg.module:factory`, `file.py:factory`) needs `trust_code=True`, like
    transformers' `trust_remote_code` (docs/artifact-format.md). `backend="inductor"`: return
    `st.compile(model, backend=...)` of it (real int8 kernels in PyTorch, inference only)."""
    loaded = load_artifact(path, model, trust_code=trust_code)
    return loaded if backend is None else compile(loaded, backend=backend)


def compile(model: nn.Module, backend: str = "inductor", *, dynamic: bool = False) -> nn.Module:
    """Return a NEW module that runs `model`'s quantized layers with PyTorch's integer kernels (oneDNN
    int8 conv / linear, int8 GEMM for dynamic activations, the int4 weight-only GEMM) through
    torch.compile with frozen weights; inference only. Layers that stay simulated are named in one
    warning per reason. A backend this torch build lacks is a ConfigError (docs/quantization.md)."""
    from .quant.torch_int8 import compile_int8

    return compile_int8(model, backend, dynamic=dynamic)


def save(model: nn.Module | Result, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a model returned by a method (or a Result) as an artifact directory (written atomically;
    an existing artifact at `path` is replaced only with `overwrite=True`)."""
    if isinstance(model, Result):
        return model.save(path, overwrite=overwrite)
    return save_artifact(model, path, overwrite=overwrite)
