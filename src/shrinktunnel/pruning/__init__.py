"""Pruning: unstructured magnitude / random with gradual (AGP) schedules and compact sparse storage,
and structured channel pruning that rewrites layers to fewer channels."""

# Unstructured pruning: importing `unstructured` registers the "prune" method.
from .sparse_layer import SparseLayer  # noqa: E402
from .unstructured import prune_context  # noqa: E402
from .unstructured_config import LayerSparsity, PruneConfig  # noqa: E402

# Structured (channel) pruning: importing `structured` registers the "prune_channels" method.
from . import structured  # noqa: E402,F401
from .config import ChannelPruneConfig, Finetune, RatioRule  # noqa: E402
