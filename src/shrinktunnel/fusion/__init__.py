"""Fusion: BatchNorm folding, merging consecutive Linears, and merging task networks into one trunk."""

from .config import FuseConfig, FuseOpsConfig, FuseOutput, LinearMerge
from .networks import MultiTaskModel, fuse_networks
from .ops import fold_bn, fuse_ops, merge_linears

__all__ = ["FuseConfig", "FuseOpsConfig", "FuseOutput", "LinearMerge", "MultiTaskModel", "fold_bn", "merge_linears",
           "fuse_ops", "fuse_networks"]
