"""Evaluations side by side: serially, in local processes, or on a Ray cluster (optional extra).

Every evaluation is a pure function of its item (a plan or a layer/action pair) and is seeded from
it (`build_plan(seed=...)`), so the results, returned in the order of the items whatever order the
workers finish in, are the same serially, in processes or on Ray. The search decides its next
round only from complete rounds, so its path does not depend on the number of workers either.

Local processes are forked: the model, the data and the eval_fn (lambdas included) are inherited,
never pickled; only the results (plain dicts) travel back. Each child runs torch on
`threads // workers` threads (at least one): a forked child must not reuse the parent's OpenMP pool.
Ray ships the same function with cloudpickle (`pip install shrinktunnel[ray]`); `ray.init()` is called
with `num_cpus=workers` unless Ray is already initialised (then its cluster is used as configured).
"""

from __future__ import annotations

import multiprocessing
import sys
from typing import Any, Callable, Iterator, Sequence

import torch

from ..core.progress import track
from ..errors import ConfigError

__all__ = ["BACKENDS", "run_all", "check_backend"]

BACKENDS = ("process", "ray")

_TASK: Callable[[Any], Any] | None = None  # the function a forked worker runs (inherited, not pickled)
_ITEMS: Sequence[Any] = ()


def check_backend(backend: str, workers: int) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is not known; use one of: {', '.join(BACKENDS)} "
                          f"(process: local processes; ray: a Ray cluster, pip install shrinktunnel[ray])")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers={workers!r} must be an integer >= 1 (1: evaluate one candidate at a time)")
    if backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("backend='ray' needs Ray: pip install 'shrinktunnel[ray]' (or use backend='process')") from None


def _init(threads: int) -> None:
    torch.set_num_threads(threads)


def _call(i: int) -> Any:
    return _TASK(_ITEMS[i])


def _ray_call(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


def run_all(fn: Callable[[Any], Any], items: Sequence[Any], *, workers: int = 1, backend: str = "process",
            threads: int = 2, description: str = "evaluations", progress: bool = True) -> Iterator[Any]:
    """Yield fn(item) for every item, in order (a progress bar with the time left when `progress`).
    `fn` must catch what an evaluation raises and return it as a failed entry."""
    items = list(items)
    if not items:
        return
    if workers == 1 or len(items) == 1 and backend == "process":
        yield from track((fn(item) for item in items), description, total=len(items), enabled=progress)
        return
    if backend == "ray":
        yield from _ray(fn, items, workers, threads, description, progress)
        return
    global _TASK, _ITEMS
    if "fork" not in multiprocessing.get_all_start_methods():
        yield from track((fn(item) for item in items), description + " (serial: no fork here)", total=len(items),
                         enabled=progress)
        return
    _TASK, _ITEMS = fn, items
    per_worker = max(1, threads // workers)
    sys.stdout.flush()
    sys.stderr.flush()
    ctx = multiprocessing.get_context("fork")
    try:
        with ctx.Pool(min(workers, len(items)), initializer=_init, initargs=(per_worker,)) as pool:
            yield from track(pool.imap(_call, range(len(items))), f"{description} ({workers} processes)",
                             total=len(items), enabled=progress)
    finally:
        _TASK, _ITEMS = None, ()


def _ray(fn, items, workers, threads, description, progress) -> Iterator[Any]:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    remote = ray.remote(num_cpus=1)(_ray_call)
    fn_ref = ray.put(fn)
    refs = [remote.remote(fn_ref, item) for item in items]
    yield from track((ray.get(r) for r in refs), f"{description} (ray)", total=len(items), enabled=progress)
