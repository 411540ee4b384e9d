"""The course's check, run fast: both models over a dataset, max over batches of ||diff||^2."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from bnstrip.core.torch_env import torch_threads
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


DEFAULT_THREADS = 1
"""torch threads for the comparison.  oneDNN and the BLAS may split a convolution's or a GEMM's sums by thread
count, and float32 sums then round differently; one thread never splits them, so the figures are the same on
every run of one machine whatever its core count.  Measured on this project's 2-core EPYC (AVX2 kernels, torch 2.13.0
CPU, shipped smallNetSaved, 10,000 images): 1.157e-09 and max |diff| 9.537e-06 bit for bit at 1, 2, 3, 4, 8 and
16 threads.  Another machine reported 9.937e-10 and 6.676e-06: the kernels oneDNN picks for the CPU's instruction
set (torch.backends.cpu.get_cpu_capability()) and the torch build change the digits after the first; the figures
stay an order of magnitude below the 1e-8 bar.  `threads=` trades the fixed count for speed."""




CHUNK_IMAGES = 200
"""Images per forward pass. Measured on smallNet (2-core EPYC, 1,000 images, interleaved): 200 is about 10%
faster than the course's 100 (larger GEMMs for fc1), while 500 and 1,000 are 20-40% slower, because the conv
activations (64 KB an image per tensor) no longer fit the last-level cache."""


def verify_models(bn_model: nn.Module, folded_model: nn.Module, images: np.ndarray, labels: np.ndarray, *,
                  batch_size: int = 100, tolerance: float = 1e-8, chunk_batches: int | None = None,
                  channels_last: bool = False, threads: int | None = DEFAULT_THREADS,
                  progress: Callable[[int, int], None] | None = None) -> VerifyResult:
    """Both models in eval mode on uint8 CHW images; the figure is per batch of `batch_size`.

    Images are decoded once per chunk (several batches at once, for throughput) and fed
    to both models; the squared norm is still summed per batch of `batch_size`, exactly
    as the course's loop does, and with the default layout every output is bit-identical
    to the course's loop.  `channels_last` lays image chunks out NHWC, which oneDNN's
    convolutions may run faster, at the price of float32 rounding that differs from the
    plain loop's in the last bits; the models themselves are not modified.  `threads` (see DEFAULT_THREADS)
    fixes torch's thread count for the run, so the figures do not vary with the machine's core count.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    with torch_threads(threads) as used:
        result = _verify(bn_model, folded_model, images, labels, batch_size, tolerance, chunk_batches, channels_last,
                         progress)
    return VerifyResult(**{**asdict(result), "threads": used})


def _verify(bn_model: nn.Module, folded_model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int,
            tolerance: float, chunk_batches: int | None, channels_last: bool,
            progress: Callable[[int, int], None] | None) -> VerifyResult:
    started = time.perf_counter()
    bn_model.eval()
    folded_model.eval()
    n = len(labels)
    chunk_batches = chunk_batches or max(1, CHUNK_IMAGES // batch_size)
    chunk = batch_size * chunk_batches
    num_batches = (n + batch_size - 1) // batch_size
    batch_sq = torch.zeros(num_batches, dtype=torch.float64)
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    max_abs, agree, correct_bn, correct_folded = 0.0, 0, 0, 0
    with torch.inference_mode():
        for start in range(0, n, chunk):
            x = to_float_tensor(images[start:start + chunk])
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            out_bn = bn_model(x)
            out_folded = folded_model(x)
            diff = (out_bn - out_folded).to(torch.float64)
            row_sq = diff.reshape(diff.shape[0], -1).square().sum(1)
            batch_index = torch.arange(start, start + len(x)) // batch_size
            batch_sq.index_add_(0, batch_index, row_sq)
            if diff.numel():
                chunk_max = float(diff.abs().max())
                max_abs = chunk_max if not chunk_max <= max_abs else max_abs  # keeps NaN visible
            pred_bn, pred_folded = out_bn.argmax(1), out_folded.argmax(1)
            y = labels_t[start:start + len(x)]
            agree += int((pred_bn == pred_folded).sum())
            correct_bn += int((pred_bn == y).sum())
            correct_folded += int((pred_folded == y).sum())
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
