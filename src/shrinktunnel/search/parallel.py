"""Evaluations side by side: serially, in local processes, or on a Ray cluster (optional extra).

Every evaluation is a pure function of its item (a plan or a layer/action pair) and is seeded from
it (`build_plan(seed=...)`), so the results, returned in the order of the items whatever order the
workers finish in, are the same serially, in processes or on Ray. The search decides its next
round only from complete rounds, so its path does not depend on the number of workers either.

Local processes are forked: the model, the data and the eval_fn (lambdas included) are inherited,
never pickled; only the results (plain dicts) travel back. Each child runs torch on
`threads // workers` threads (at least one): a forked child must not reuse the parent's OpenMP pool.
Ray ships the same function with its cloudpickle (`pip install shrinktunnel[ray]`); `ray.init()` is
called with `num_cpus=workers` (or joins `address`) unless Ray is already initialised. The user's own
modules (a model class in `model.py` that imports its `train.py`, outside any installed package)
are registered to travel BY VALUE (`cloudpickle.register_pickle_by_value`), so the workers need
neither the files nor the user's sys.path. A failure on the cluster itself (a worker that cannot
unpickle, a dead node) is a ModelError with one line, never a raw RayTaskError.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import sysconfig
from typing import Any, Callable, Iterator, Sequence

import torch

from ..core.progress import track
from ..errors import ConfigError, ModelError, one_line

__all__ = ["BACKENDS", "run_all", "check_backend", "user_modules"]

BACKENDS = ("process", "ray")

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


def _worker(fn: Callable[[Any], Any], items: Sequence[Any], threads: int, todo: Any, done: Any) -> None:
    """A forked process: `fn` and `items` are its arguments, inherited with the fork (never pickled); it takes
    indices from `todo` until a None and sends (index, result) back on `done`."""
    torch.set_num_threads(threads)
    for i in iter(todo.get, None):
        done.put((i, fn(items[i])))


def _forked(fn: Callable[[Any], Any], items: Sequence[Any], workers: int, threads: int) -> Iterator[Any]:
    """fn(item) for every item in forked processes, yielded in the items' order. A worker that dies (killed,
    out of memory) is a ModelError, not a hang."""
    import queue

    ctx = multiprocessing.get_context("fork")
    todo, done = ctx.Queue(), ctx.Queue()
    n = min(workers, len(items))
    for i in range(len(items)):
        todo.put(i)
    for _ in range(n):
        todo.put(None)
    sys.stdout.flush()
    sys.stderr.flush()
    procs = [ctx.Process(target=_worker, args=(fn, items, threads, todo, done), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    ready: dict[int, Any] = {}
    try:
        for i in range(len(items)):
            while i not in ready:
                try:
                    j, result = done.get(timeout=1.0)
                    ready[j] = result
                except queue.Empty:
                    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise ModelError(f"an evaluation process died (exit code {dead[0]}: killed, or out of memory); "
                                         "use fewer workers, or workers=1") from None
            yield ready.pop(i)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)


def _ray_call(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


def run_all(fn: Callable[[Any], Any], items: Sequence[Any], *, workers: int = 1, backend: str = "process",
            threads: int = 2, description: str = "evaluations", progress: bool = True,
            address: str | None = None) -> Iterator[Any]:
    """Yield fn(item) for every item, in order (a progress bar with the time left when `progress`).
    `fn` must catch what an evaluation raises and return it as a failed entry."""
    items = list(items)
    if not items:
        return
    if workers == 1 or len(items) == 1 and backend == "process":
        yield from track((fn(item) for item in items), description, total=len(items), enabled=progress)
        return
    if backend == "ray":
        yield from _ray(fn, items, workers, description, progress, address)
        return
    if "fork" not in multiprocessing.get_all_start_methods():
        yield from track((fn(item) for item in items), description + " (serial: no fork here)", total=len(items),
                         enabled=progress)
        return
    per_worker = max(1, threads // workers)
    yield from track(_forked(fn, items, workers, per_worker), f"{description} ({workers} processes)",
                     total=len(items), enabled=progress)


def user_modules() -> list[str]:
    """Names of the imported modules that live outside the Python installation, its site-packages and
    shrinktunnel: the user's own files (model.py, train.py), which Ray workers cannot import."""
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                           *(sysconfig.get_paths().get(k) for k in ("purelib", "platlib", "stdlib")))
             if p}
    own = os.path.realpath(os.path.dirname(os.path.dirname(__file__)))  # the shrinktunnel package
    names = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path or name == "__main__" or name.startswith("shrinktunnel") or not os.path.isfile(path):
            continue
        real = os.path.realpath(path)
        if real.startswith(own + os.sep) or any(real.startswith(r + os.sep) for r in roots):
            continue
        names.append(name)
    return sorted(names)


def ship_by_value(pickler: Any) -> list[str]:
    """Register the user's modules with `pickler` (a cloudpickle) to be pickled by value; returns their names."""
    names = []
    for name in user_modules():
        try:
            pickler.register_pickle_by_value(sys.modules[name])
            names.append(name)
        except (ValueError, TypeError):  # not a plain module (a namespace package, a C extension)
            continue
    return names


def _ray(fn, items, workers, description, progress, address) -> Iterator[Any]:
    import ray
    from ray import cloudpickle

    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        except Exception as exc:  # a wrong address, a cluster that does not answer
            raise ModelError(f"Ray could not start or join a cluster{f' at {address!r}' if address else ''}: "
                             f"{one_line(exc)}; check --ray-address (ray start --head prints it) or use "
                             f"--backend process") from None
    ship_by_value(cloudpickle)
    remote = ray.remote(num_cpus=1)(_ray_call)
    fn_ref = ray.put(fn)
    refs = [remote.remote(fn_ref, item) for item in items]
    yield from track((_ray_get(ray, r) for r in refs), f"{description} (ray)", total=len(items), enabled=progress)


def _ray_get(ray, ref) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:  # the task never ran our function (it catches its own errors)
        cause = one_line(getattr(exc, "cause", None) or exc).split(" traceback:")[0].split(" Traceback")[0]
        raise ModelError(f"a Ray worker could not run the evaluation: {cause}; the model, data and "
                         f"eval_fn travel by value, but the packages they import must be installed on every "
                         f"worker (or use --backend process)") from None
