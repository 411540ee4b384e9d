"""Every core, identical figures: work split into parts that each run on one intra-op thread, in a thread pool.

oneDNN and the BLAS split a convolution's or a matmul's sums across torch's intra-op threads, and a
float32 sum split differently rounds differently, so a figure computed with 2 threads can differ in
its last digits from the same figure with 1. Running each part (a chunk of images, a few samples) on
one intra-op thread and combining the parts in their order gives the same bits at any worker count,
while the workers still use every core; on a loaded machine it also avoids OpenMP's barrier waits,
which is what made a 2-thread self-check swing from 0.3 s to 6 s.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_IN_WORKER = threading.local()


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def map_single_threaded(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """[fn(item) for item in items], the items spread over `workers` threads (default: one per core), every torch op
    on one intra-op thread; results in the items' order. The caller's grad and inference modes (thread-local in
    torch) hold in the workers too. Called from inside a worker, it runs the items in turn."""
    import torch

    from bnstrip.core.torch_env import torch_threads

    items = list(items)
    count = min(len(items), available_cores() if workers is None else max(1, workers))
    if getattr(_IN_WORKER, "active", False) or count <= 1:
        with contextlib.nullcontext() if getattr(_IN_WORKER, "active", False) else torch_threads(1):
            return [fn(item) for item in items]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(item: T) -> R:
        _IN_WORKER.active = True
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(item)

    with torch_threads(1), ThreadPoolExecutor(max_workers=count, thread_name_prefix="bnstrip") as pool:
        return list(pool.map(run, items))

