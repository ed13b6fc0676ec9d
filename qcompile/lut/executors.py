"""Where independent search tasks run: in this process, on a local process pool, or on a Ray cluster.

One interface, `map(fn, tasks) -> results in task order`, with a progress bar. A task's result
depends only on its arguments (the fitting code seeds itself from them), so every executor returns
the same results.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Callable, Sequence

from tqdm import tqdm

from ..config import EXECUTOR_NAMES
from ..errors import QCompileError


def _one_thread_per_worker() -> None:
    import torch

    torch.set_num_threads(1)


class SerialExecutor:
    def map(self, fn: Callable, tasks: Sequence[tuple], description: str = "") -> list:
        return [fn(*task) for task in tqdm(tasks, desc=description, unit="task", leave=False)]


class LocalExecutor:
    """A pool of spawned processes (fork is unsafe once torch or ONNX Runtime threads exist)."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or os.cpu_count() or 1

    def map(self, fn: Callable, tasks: Sequence[tuple], description: str = "") -> list:
        if self.workers == 1 or len(tasks) <= 1:
            return SerialExecutor().map(fn, tasks, description)
        results: list = [None] * len(tasks)
        with ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                 initializer=_one_thread_per_worker) as pool:
            futures = {pool.submit(fn, *task): index for index, task in enumerate(tasks)}
            for future in tqdm(as_completed(futures), total=len(futures), desc=description, unit="task", leave=False):
                results[futures[future]] = future.result()
        return results


class RayExecutor:
    """Tasks as Ray remote functions; `address` None starts (or joins) a local Ray instance."""

    def __init__(self, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise QCompileError("--executor ray needs Ray: pip install 'ray[default]'") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address or os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True,
                     log_to_driver=False, include_dashboard=False)

    def map(self, fn: Callable, tasks: Sequence[tuple], description: str = "") -> list:
        remote = self.ray.remote(num_cpus=1)(_ray_task).remote
        pending = {remote(fn, *task): index for index, task in enumerate(tasks)}
        results: list = [None] * len(tasks)
        with tqdm(total=len(tasks), desc=description, unit="task", leave=False) as bar:
            waiting = list(pending)
            while waiting:
                done, waiting = self.ray.wait(waiting, num_returns=1)
                results[pending[done[0]]] = self.ray.get(done[0])
                bar.update()
        return results


def _ray_task(fn: Callable, *args):
    _one_thread_per_worker()
    return fn(*args)


def make_executor(name: str, workers: int | None = None, address: str | None = None):
    if name == "serial":
        return SerialExecutor()
    if name == "local":
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(address)
    raise QCompileError(f"executor must be one of {', '.join(EXECUTOR_NAMES)}; got {name!r}")
