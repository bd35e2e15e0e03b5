"""Where an artifact's original architecture comes from, and who consented to running its code.

The `trust_remote_code=False` convention of transformers (docs/artifact-format.md, "Rebuilding"):
an artifact is data, and loading it runs no code that its manifest names unless the caller says so.
Without consent a reader builds the architecture only from

- the module the caller passes (`st.load(dir, model=...)`, `--model REF`);
- the project's own assets (`shrinktunnel.assets:<factory>`: code installed with shrinktunnel itself);
- a Hugging Face model's config.json (`model.transformers`), with the class looked up by its
  `model_type` in transformers' own auto mappings, never imported from a path the manifest gives.

Any other `model.ref` (`package.module:factory`, `file.py:factory`) is code, and runs only with
`trust_code=True` (`--trust-model-code`); so is another artifact directory it may name (outside this
artifact: read only with consent, then under the same rules, the chain checked for cycles).
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError, ModelError, UntrustedCodeError, one_line

__all__ = ["ASSETS_MODULE", "is_builtin_ref", "transformers_entry", "build_transformers", "meta_copy",
           "ST_DTYPES", "MAX_CHAIN"]

ASSETS_MODULE = "shrinktunnel.assets"
MAX_CHAIN = 8  # artifacts whose model.ref names another artifact: at most this many in a chain

ST_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
             torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
             torch.float64: "F64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
             torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}


def is_builtin_ref(ref: str) -> bool:
    """`shrinktunnel.assets:<name>` where <name> is a public function defined by shrinktunnel's own
    asset modules (not something they import): code that came with the toolkit, not with the file."""
    module, sep, attr = ref.partition(":")
    if module != ASSETS_MODULE or not sep or not attr.isidentifier() or attr.startswith("_"):
        return False
    import importlib
    import inspect

    assets = importlib.import_module(ASSETS_MODULE)
    fn = getattr(assets, attr, None)
    return inspect.isfunction(fn) and (fn.__module__ or "").startswith("shrinktunnel.assets")


# -- Hugging Face ----------------------------------------------------------------------------------

def _auto_mapping_names() -> list[dict[str, Any]]:
    from transformers.models.auto import modeling_auto

    return [getattr(modeling_auto, n) for n in dir(modeling_auto)
            if n.startswith("MODEL") and n.endswith("_MAPPING_NAMES") and isinstance(getattr(modeling_auto, n), dict)]


def _architecture_known(model_type: str, architecture: str) -> bool:
    for mapping in _auto_mapping_names():
        names = mapping.get(model_type)
        if names == architecture or (isinstance(names, (tuple, list)) and architecture in names):
            return True
    return False


def transformers_entry(model: nn.Module) -> dict[str, Any] | None:
    """{"architecture", "config"} of a transformers PreTrainedModel whose class the auto mappings
    know for its model_type (what `build_transformers` can rebuild without code), else None."""
    cls = type(model)
    if not cls.__module__.startswith("transformers.") or not hasattr(model, "config"):
        return None
    try:
        config = model.config.to_dict()
        model_type = config.get("model_type")
        if not isinstance(model_type, str) or not _architecture_known(model_type, cls.__name__):
            return None
    except Exception:  # an unusual config: no declarative description, the caller passes model=
        return None
    config.pop("auto_map", None)  # remote-code pointers are never followed
    attn = getattr(model.config, "_attn_implementation", None)
    entry = {"architecture": cls.__name__, "config": config}
    if attn in ("eager", "sdpa"):
        entry["attn_implementation"] = attn
    # Only a description that rebuilds this very structure (constructor arguments beyond the config,
    # e.g. add_pooling_layer=False, are not in it): compared on the meta device, nothing allocated.
    try:
        rebuilt = build_transformers(entry, meta=True).state_dict()
    except Exception:
        return None
    own = model.state_dict()
    if list(rebuilt) != list(own) or any(tuple(rebuilt[k].shape) != tuple(own[k].shape) or rebuilt[k].dtype != own[k].dtype
                                         for k in own):
        return None
    return entry


def build_transformers(entry: dict[str, Any], *, meta: bool) -> nn.Module:
    """The model `entry` describes, its class found through transformers' auto mappings by model_type
    (the manifest's architecture name is only compared with what the mappings list, never imported).
    `meta`: build on the meta device (nothing allocated) for the dry run."""
    try:
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:
        raise ArtifactError("the artifact's model is a Hugging Face model (model.transformers) and transformers is not "
                            "installed: pip install transformers, or pass model=... (--model REF)") from None
    config = dict(entry["config"])
    model_type, arch = config.pop("model_type"), entry["architecture"]
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ArtifactError(f"model.transformers: model_type {model_type[:60]!r} is not one transformers "
                            f"{transformers.__version__} knows; pass model=... (--model REF)")
    if not _architecture_known(model_type, arch):
        raise ArtifactError(f"model.transformers: {arch[:80]!r} is not a {model_type} class of transformers' auto "
                            "mappings; pass model=... (--model REF)")
    for key in ("auto_map", "transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        config.pop(key, None)
    attn = entry.get("attn_implementation", "eager")
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **config)
        cls = getattr(transformers, arch)
        if meta:
            with torch.device("meta"):
                return cls._from_config(cfg, attn_implementation=attn if attn in ("eager", "sdpa") else "eager")
        return cls._from_config(cfg, attn_implementation=attn if attn in ("eager", "sdpa") else "eager").eval()
    except Exception as exc:
        raise ArtifactError(f"model.transformers: cannot build {arch[:80]} from its config: {one_line(exc)}") from None


# -- the dry run -----------------------------------------------------------------------------------

def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers live on the meta device: the structure, no data
    (built without first copying the real tensors)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in memo:
            continue
        m = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
    return copy.deepcopy(model, memo)


def untrusted(ref: str, root: Path) -> UntrustedCodeError:
    return UntrustedCodeError(
        ref,
        f"artifact {str(root)!r} names code to rebuild its model ({ref[:200]!r}), and loading runs no code (nor reads "
        "anything outside the artifact) an artifact names without your consent: pass the original model "
        "(st.load(dir, model=...)), or, if you trust whoever made the artifact, st.load(dir, trust_code=True)",
    )


def wrap_model_error(ref: str, exc: ModelError) -> ArtifactError:
    return ArtifactError(f"cannot rebuild the original model from {ref[:200]!r}: {exc}; or pass model=...")
