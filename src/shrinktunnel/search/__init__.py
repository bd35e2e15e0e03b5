"""Search: per-layer sensitivity analysis (`analyze`) and, on it, the budgeted search (`auto`).

Registers no method: it drives the registered ones, one layer and one action at a time.
"""

from .actions import ACTIONS, DEFAULT_ACTIONS, Action, resolve_actions
from .analysis import Analysis, analyze
from .auto import OBJECTIVES, AutoResult, auto

__all__ = ["ACTIONS", "DEFAULT_ACTIONS", "OBJECTIVES", "Action", "Analysis", "AutoResult", "analyze", "auto",
           "resolve_actions"]
