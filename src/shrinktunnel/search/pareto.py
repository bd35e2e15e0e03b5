"""Moved to core/pareto.py (report/ draws the front too, and report sits below search)."""

from ..core.pareto import pareto_front  # noqa: F401

__all__ = ["pareto_front"]
