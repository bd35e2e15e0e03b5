"""Weight sharing: k-means codebooks per layer, codebook fine-tuning, entropy-coded storage."""

from .config import ClusterConfig, ClusterOverride, CodebookTuning, Coding, Init, SparseStorage, Trainable, TuneLoss
from .kmeans import kmeans_1d
from .layer import ClusteredLayer
from .method import cluster_model, replay_cluster, storage_report
from .report import storage_table

__all__ = [
    "ClusterConfig", "ClusterOverride", "CodebookTuning", "Coding", "Init", "SparseStorage", "Trainable", "TuneLoss",
    "ClusteredLayer", "kmeans_1d", "cluster_model", "replay_cluster", "storage_report", "storage_table",
]
