"""Low-rank and tensor decomposition: truncated SVD, spatial separable, channel SVD, Tucker-2, CP."""
