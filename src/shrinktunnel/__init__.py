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
from .api import cast, compress, load, quantize, save
from .fuse import FuseConfig, FuseOpsConfig
from .distill import DistillConfig, Hint, KeepLayersConfig, Relation
from .decompose import ConvScheme, DecomposeConfig
from .core.history import set_model_ref
from .core.recipe import load_recipe
from .core.result import Result
from .errors import ArtifactError, ConfigError, DataError, ExportError, ModelError, ShrinkError
from .export import export_onnx
from .quant import ActivationQuant, CastConfig, QuantConfig, WeightQuant
from .cluster import ClusterConfig, ClusterOverride, CodebookTuning  # noqa: E402
from .api import cluster  # noqa: E402  (st.cluster: the function, shrinktunnel.cluster: the package)
from .quant.qat import QATConfig
from .api import convert_qat, prepare_qat, qat  # noqa: E402
from .search import Action, Analysis, AutoConfig, AutoResult, RecoveryConfig, analyze, auto
from .prune import ChannelPruneConfig, LayerSparsity, PruneConfig  # noqa: E402
from .api import prune  # noqa: E402  (st.prune: the function, shrinktunnel.prune: the package)
from .api import distill, fuse  # noqa: E402  (st.distill / st.fuse: the functions; shrinktunnel.distill / .fuse: the packages)
from .api import decompose  # noqa: E402  (st.decompose: the function, shrinktunnel.decompose: the package)
from .api import compile  # noqa: E402,A004  (st.compile: real int8 kernels in PyTorch, quant/torch_int8.py)
from .onnx_input import load_onnx  # noqa: E402  (an .onnx file as a PyTorch module, docs/onnx-input.md)
from .prune.sparse_kernels import use_sparse_kernels  # noqa: E402  (pruned Linears on torch.sparse products, docs/pruning.md)

__all__ = [
    "__version__", "measure", "quantize", "cast", "compress", "load", "save", "export_onnx", "load_recipe", "set_model_ref",
    "Result", "QuantConfig", "CastConfig", "WeightQuant", "ActivationQuant",
    "cluster", "ClusterConfig", "ClusterOverride", "CodebookTuning",
    "qat", "prepare_qat", "convert_qat", "QATConfig",
    "analyze", "auto", "Action", "Analysis", "AutoConfig", "AutoResult", "RecoveryConfig",
    "prune", "ChannelPruneConfig", "PruneConfig", "LayerSparsity",
    "distill", "DistillConfig", "Hint", "KeepLayersConfig", "Relation", "fuse", "FuseConfig", "FuseOpsConfig",
    "decompose", "DecomposeConfig", "ConvScheme", "compile", "load_onnx", "use_sparse_kernels",
    "ShrinkError", "ConfigError", "DataError", "ModelError", "ArtifactError", "ExportError",
]
