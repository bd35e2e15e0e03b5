"""The Pareto frontier of evaluated candidates: higher metric, lower cost."""

from __future__ import annotations

from typing import Sequence

__all__ = ["pareto_front"]


def pareto_front(costs: Sequence[float], metrics: Sequence[float]) -> list[int]:
    """Indices of the points no other point dominates (cost <= and metric >=, one strictly), in
    order of increasing cost. Points whose cost or metric is None are ignored; of exact duplicates
    the first is kept."""
    points = [(c, m, i) for i, (c, m) in enumerate(zip(costs, metrics)) if c is not None and m is not None]
    points.sort(key=lambda p: (p[0], -p[1], p[2]))  # cheapest first, best metric first among equals
    front, best = [], float("-inf")
    for c, m, i in points:
        if m > best:
            front.append(i)
            best = m
    return front
