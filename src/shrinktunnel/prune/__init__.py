"""Pruning: unstructured magnitude / random with gradual (AGP) schedules and compact sparse storage,
and structured channel pruning that rewrites layers to fewer channels."""
