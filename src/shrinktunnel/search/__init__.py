"""Search: per-layer sensitivity analysis (`analyze`) and, on it, the budgeted search (`auto`).

Registers no method: it drives the registered ones, one layer and one action at a time.
"""

from .actions import ACTIONS, DEFAULT_ACTIONS, Action, resolve_actions
from .analysis import Analysis, analyze
from .auto import OBJECTIVES, AutoResult, auto
from .config import AnalyzeConfig, AutoConfig, ParallelConfig
from .parallel import BACKENDS
from .plan import RecoveryConfig, build_plan, plan_stages

__all__ = ["ACTIONS", "AnalyzeConfig", "AutoConfig", "ParallelConfig", "BACKENDS", "DEFAULT_ACTIONS", "OBJECTIVES", "Action", "Analysis", "AutoResult", "RecoveryConfig",
           "analyze", "auto", "build_plan", "plan_stages", "resolve_actions"]
