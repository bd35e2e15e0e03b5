"""Fusion: BatchNorm folding, merging consecutive Linears, and merging task networks into one trunk."""
