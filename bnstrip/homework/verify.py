"""The course's check, run fast: both models over a dataset, max over batches of ||diff||^2."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from bnstrip.core.torch_env import torch_threads
from bnstrip.core.threads import available_cores
from bnstrip.homework.data import to_float_tensor


@dataclass(frozen=True)
class VerifyResult:
    """Figures of one verify run; `max_batch_sq_norm` is the course's figure."""

    max_batch_sq_norm: float
    max_abs_diff: float
    agreement: float
    accuracy_bn: float
    accuracy_folded: float
    images: int
    batch_size: int
    tolerance: float
    seconds: float
    threads: int = 0

    @property
    def passed(self) -> bool:
        return self.max_batch_sq_norm < self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


DEFAULT_THREADS = None
"""Workers for the comparison; None: one per available core. Every chunk of images runs on one worker with one
intra-op thread, and the chunks' figures are combined in image order, so every figure is bit-identical whatever the
worker count: oneDNN and the BLAS never split a sum across threads (which would round float32 sums differently), and
the chunks are the same at any count.  Measured on this project's 2-core EPYC (AVX2 kernels, torch 2.13.0 CPU,
shipped smallNetSaved, 10,000 images): 1.157e-09 and max |diff| 9.537e-06 at 1, 2 and 4 workers.  Another machine
reported 9.937e-10 and 6.676e-06: the kernels oneDNN picks for the CPU's instruction set
(torch.backends.cpu.get_cpu_capability()) and the torch build change the digits after the first; the figures stay
an order of magnitude below the 1e-8 bar."""


CHUNK_IMAGES = 200
"""Images per forward pass. Measured on smallNet (2-core EPYC, 1,000 images, interleaved): 200 is about 10%
faster than the course's 100 (larger GEMMs for fc1), while 500 and 1,000 are 20-40% slower, because the conv
activations (64 KB an image per tensor) no longer fit the last-level cache."""


@dataclass
class _Chunk:
    """One chunk's figures: squared norm per image (float64), max |diff| and the three counts."""

    row_sq: torch.Tensor
    max_abs: float
    agree: int
    correct_bn: int
    correct_folded: int


def verify_models(bn_model: nn.Module, folded_model: nn.Module, images: np.ndarray, labels: np.ndarray, *,
                  batch_size: int = 100, tolerance: float = 1e-8, chunk_batches: int | None = None,
                  channels_last: bool = False, threads: int | None = DEFAULT_THREADS,
                  progress: Callable[[int, int], None] | None = None) -> VerifyResult:
    """Both models in eval mode on uint8 CHW images; the figure is per batch of `batch_size`.

    Images are decoded once per chunk (several batches at once, for throughput) and fed
    to both models; the squared norm is still summed per batch of `batch_size`, exactly
    as the course's loop does, and with the default layout every output is bit-identical
    to the course's loop run on one thread.  `channels_last` lays image chunks out NHWC, which oneDNN's
    convolutions may run faster, at the price of float32 rounding that differs from the
    plain loop's in the last bits; the models themselves are not modified.  `threads` workers (default: one per
    core) run the chunks concurrently, each on one intra-op thread (see DEFAULT_THREADS): the figures do not vary
    with it.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    workers = available_cores() if threads is None else threads
    with torch_threads(1):
        result = _verify(bn_model, folded_model, images, labels, batch_size, tolerance, chunk_batches, channels_last,
                         progress, workers)
    return VerifyResult(**{**asdict(result), "threads": workers})


def _run_chunk(bn_model: nn.Module, folded_model: nn.Module, images: np.ndarray, labels: torch.Tensor,
               channels_last: bool) -> _Chunk:
    with torch.inference_mode():  # thread-local: entered in the worker
        x = to_float_tensor(images)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out_bn = bn_model(x)
        out_folded = folded_model(x)
        diff = (out_bn - out_folded).to(torch.float64)
        row_sq = diff.reshape(diff.shape[0], -1).square().sum(1)
        max_abs = float(diff.abs().max()) if diff.numel() else 0.0
        pred_bn, pred_folded = out_bn.argmax(1), out_folded.argmax(1)
        return _Chunk(row_sq, max_abs, int((pred_bn == pred_folded).sum()), int((pred_bn == labels).sum()),
                      int((pred_folded == labels).sum()))


def _verify(bn_model: nn.Module, folded_model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int,
            tolerance: float, chunk_batches: int | None, channels_last: bool,
            progress: Callable[[int, int], None] | None, workers: int) -> VerifyResult:
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    bn_model.eval()
    folded_model.eval()
    n = len(labels)
    chunk = batch_size * (chunk_batches or max(1, CHUNK_IMAGES // batch_size))
    num_batches = (n + batch_size - 1) // batch_size
    batch_sq = torch.zeros(num_batches, dtype=torch.float64)
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    max_abs, agree, correct_bn, correct_folded = 0.0, 0, 0, 0
    starts = range(0, n, chunk)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="bnstrip-verify") as pool:
        futures = [pool.submit(_run_chunk, bn_model, folded_model, images[start:start + chunk],
                               labels_t[start:start + chunk], channels_last) for start in starts]
        for start, future in zip(starts, futures, strict=True):  # combined in image order: the same sums at any worker count
            part = future.result()
            batch_index = torch.arange(start, start + len(part.row_sq)) // batch_size
            batch_sq.index_add_(0, batch_index, part.row_sq)
            max_abs = part.max_abs if not part.max_abs <= max_abs else max_abs  # keeps NaN visible
            agree, correct_bn, correct_folded = (agree + part.agree, correct_bn + part.correct_bn,
                                                 correct_folded + part.correct_folded)
            if progress:
                progress(min(start + chunk, n), n)
    if not torch.isfinite(batch_sq).all():
        figure = float("inf")
    else:
        figure = float(batch_sq.max()) if num_batches else 0.0
    return VerifyResult(
        max_batch_sq_norm=figure,
        max_abs_diff=max_abs,
        agreement=agree / n if n else 1.0,
        accuracy_bn=correct_bn / n if n else 0.0,
        accuracy_folded=correct_folded / n if n else 0.0,
        images=n,
        batch_size=batch_size,
        tolerance=tolerance,
        seconds=time.perf_counter() - started,
    )
