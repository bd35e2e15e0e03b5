"""Weight sharing: k-means codebooks per layer, codebook fine-tuning, entropy-coded storage."""
