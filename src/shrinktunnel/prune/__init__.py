"""Pruning: unstructured magnitude / random with gradual (AGP) schedules and compact sparse storage,
and structured channel pruning that rewrites layers to fewer channels."""

# Unstructured pruning: importing `unstructured` registers the "prune" method.
from .sparse_layer import SparseLayer  # noqa: E402
from .unstructured import prune_context  # noqa: E402
from .unstructured_config import LayerSparsity, PruneConfig  # noqa: E402
