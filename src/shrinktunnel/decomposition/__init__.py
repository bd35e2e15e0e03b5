"""Low-rank and tensor decomposition: truncated SVD, spatial separable, channel SVD, Tucker-2, CP."""

from .config import BudgetMetric, BudgetScope, ConvScheme, DecomposeConfig, FineTune, LayerRank, Method
from .layers import LowRank
from .method import decompose_model, replay_decompose

__all__ = ["DecomposeConfig", "ConvScheme", "BudgetMetric", "BudgetScope", "Method", "FineTune", "LayerRank", "LowRank", "decompose_model",
           "replay_decompose"]
