"""shrinktunnel: a model shrink tunnel. A trained PyTorch model goes in with a little data; a
smaller, faster model comes out, with the measured figures that prove it.

    import shrinktunnel as st
    q = st.quantize(model, st.QuantConfig(), data=calib)
    result = st.compress(model, "recipe.yaml", data=calib, eval_fn=...)
    result.save("out/"); model = st.load("out/")
    st.export_onnx(result, "model.onnx", example_inputs=x)
"""

from . import measure
from ._version import __version__
from .api import (cast, cluster, compile, compress, convert_qat, decompose, distill, fuse, load, prepare_qat,  # noqa: A004
                  prune, qat, quantize, save)
from .clustering import ClusterConfig, ClusterOverride, CodebookTuning
from .core.history import set_model_ref
from .core.recipe import load_recipe
from .core.result import Result
from .decomposition import ConvScheme, DecomposeConfig
from .distillation import DistillConfig, Hint, KeepLayersConfig, Relation
from .errors import ArtifactError, ConfigError, DataError, ExportError, ModelError, ShrinkError
from .export import export_onnx
from .fusion import FuseConfig, FuseOpsConfig
from .onnx_input import load_onnx  # an .onnx file as a PyTorch module (docs/onnx-input.md)
from .pruning import ChannelPruneConfig, LayerSparsity, PruneConfig
from .pruning.sparse_kernels import use_sparse_kernels  # pruned Linears on torch.sparse products (docs/pruning.md)
from .quant import ActivationQuant, CastConfig, QuantConfig, WeightQuant
from .quant.qat import QATConfig
from .search import Action, AnalyzeConfig, Analysis, AutoConfig, AutoResult, RecoveryConfig, analyze, auto

# The functions have the verbs (st.prune, st.cluster, ...); the method packages are nouns
# (shrinktunnel.pruning, .clustering, .decomposition, .distillation, .fusion), so no import rebinds a package.
__all__ = [
    "__version__", "measure", "quantize", "cast", "compress", "load", "save", "export_onnx", "load_recipe", "set_model_ref",
    "Result", "QuantConfig", "CastConfig", "WeightQuant", "ActivationQuant",
    "cluster", "ClusterConfig", "ClusterOverride", "CodebookTuning",
    "qat", "prepare_qat", "convert_qat", "QATConfig",
    "analyze", "auto", "Action", "Analysis", "AnalyzeConfig", "AutoConfig", "AutoResult", "RecoveryConfig",
    "prune", "ChannelPruneConfig", "PruneConfig", "LayerSparsity",
    "distill", "DistillConfig", "Hint", "KeepLayersConfig", "Relation", "fuse", "FuseConfig", "FuseOpsConfig",
    "decompose", "DecomposeConfig", "ConvScheme", "compile", "load_onnx", "use_sparse_kernels",
    "ShrinkError", "ConfigError", "DataError", "ModelError", "ArtifactError", "ExportError",
]
