"""Latency of a BatchNorm model against its folded twin, measured so that noise stays visible.

Folding exists to make inference cheaper; whether it did, on this machine, is a
measurement, not a promise.  Candidates run interleaved (A B A B ...) so that a
slow phase of the machine hits all of them alike; each speed-up is the median of
per-round ratios, reported with its spread, and called "within noise" when the
timings' interquartile ranges overlap or the ratios' contains 1.  The library only
measures: it prints nothing and returns dataclasses.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from bnstrip._torch import BatchNormBase
from bnstrip.errors import InputError
from bnstrip.core.compare import seeded_inputs
from bnstrip.core.torch_env import torch_threads  # noqa: F401 - re-exported: scripts and tests time with it

SMALLNET_ARCH = "smallnet"
DEFAULT_SAMPLE_SHAPE = (3, 32, 32)


# --------------------------------------------------------------------------- statistics


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without importing numpy for five numbers."""
    if not sorted_values:
        return float("nan")
    position = (len(sorted_values) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


@dataclass(frozen=True)
class Spread:
    """Median, min/max and interquartile range of a sample of numbers."""

    median: float
    min: float
    max: float
    q1: float
    q3: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        ordered = sorted(values)
        if not ordered:
            nan = float("nan")
            return cls(nan, nan, nan, nan, nan)
        return cls(statistics.median(ordered), ordered[0], ordered[-1], _quantile(ordered, 0.25), _quantile(ordered, 0.75))

    def overlaps(self, other: Spread) -> bool:
        """Whether the interquartile ranges overlap."""
        return self.q1 <= other.q3 and other.q1 <= self.q3

    def to_dict(self, suffix: str = "") -> dict[str, float]:
        return {f"median{suffix}": self.median, f"min{suffix}": self.min, f"max{suffix}": self.max,
                f"q1{suffix}": self.q1, f"q3{suffix}": self.q3}


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one candidate, one value per interleaved round."""

    label: str
    seconds: tuple[float, ...]
    calls_per_sample: int

    @property
    def spread(self) -> Spread:
        return Spread.of(self.seconds)

    @property
    def median(self) -> float:
        return self.spread.median

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, **self.spread.to_dict("_s"), "samples": len(self.seconds),
                "calls_per_sample": self.calls_per_sample}


@dataclass(frozen=True)
class Speedup:
    """baseline time / candidate time, from the rounds' paired ratios (> 1: the candidate is faster)."""

    baseline: str
    candidate: str
    ratios: tuple[float, ...]
    within_noise: bool

    @property
    def spread(self) -> Spread:
        return Spread.of(self.ratios)

    @property
    def median(self) -> float:
        return self.spread.median

    @property
    def verdict(self) -> str:
        if self.within_noise:
            return "within noise"
        ratio = self.median
        return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "candidate": self.candidate, **self.spread.to_dict(),
                "within_noise": self.within_noise, "verdict": self.verdict}


def compare(baseline: Timing, candidate: Timing) -> Speedup:
    """Paired ratios of two interleaved timings.

    Within noise when either the timings' interquartile ranges overlap or the
    interquartile range of the paired ratios contains 1: a difference smaller than
    the machine's own jitter is not a speed-up.
    """
    ratios = tuple(b / c if c > 0 else float("inf") for b, c in zip(baseline.seconds, candidate.seconds, strict=True))
    ratio_spread = Spread.of(ratios)
    noisy = baseline.spread.overlaps(candidate.spread) or ratio_spread.q1 <= 1.0 <= ratio_spread.q3
    return Speedup(baseline.label, candidate.label, ratios, noisy)


# --------------------------------------------------------------------------- timing


def _time_calls(fn: Callable[[], Any], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls


def time_interleaved(candidates: Mapping[str, Callable[[], Any]], *, repeat: int = 20, warmup: int = 3,
                     min_sample_seconds: float = 0.02,
                     progress: Callable[[int, int], None] | None = None) -> dict[str, Timing]:
    """Seconds per call of each candidate, measured round-robin: each round times every candidate once.

    Warm-up calls come first (allocator, oneDNN primitive caches, lazy init).  Every
    sample times the same number of calls for all candidates, enough that the fastest
    takes at least `min_sample_seconds`, so the timer's resolution does not matter
    (0: one call a sample and no calibration call, for candidates that take seconds).
    """
    if repeat < 1:
        raise InputError(f"--repeat {repeat}: needs at least 1 round")
    if warmup < 0:
        raise InputError(f"--warmup {warmup}: cannot be negative")
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    calls = 1
    if min_sample_seconds > 0:  # calibrate; with 0, one call a sample (for candidates that take seconds)
        fastest = min(_time_calls(candidates[name], 1) for name in names)
        calls = max(1, math.ceil(min_sample_seconds / fastest)) if fastest > 0 else 1
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeat):
        for name in names:
            samples[name].append(_time_calls(candidates[name], calls))
        if progress:
            progress(round_index + 1, repeat)
    return {name: Timing(name, tuple(values), calls) for name, values in samples.items()}


# --------------------------------------------------------------------------- BN model vs folded model


@dataclass(frozen=True)
class BatchResult:
    """One batch size: the two timings and the folded model's speed-up over the BN model."""

    batch_size: int
    bn: Timing
    folded: Timing
    speedup: Speedup

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "calls_per_sample": self.bn.calls_per_sample,
                "bn": self.bn.to_dict(), "folded": self.folded.to_dict(), "speedup": self.speedup.to_dict()}


@dataclass(frozen=True)
class BenchReport:
    """Every batch size of one `bnstrip bench` run, with what is needed to reproduce it."""

    results: list[BatchResult]
    sample_shape: tuple[int, ...]
    threads: int
    repeat: int
    warmup: int
    torch_version: str = field(default_factory=lambda: torch.__version__)

    def to_dict(self) -> dict[str, Any]:
        return {"sample_shape": list(self.sample_shape), "threads": self.threads, "repeat": self.repeat,
                "warmup": self.warmup, "torch": self.torch_version, "results": [r.to_dict() for r in self.results]}


def seeded_batch(batch_size: int, sample_shape: Sequence[int], seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Image-like uniform [0, 1) inputs from a private generator: the same for both models."""
    return seeded_inputs((batch_size, *sample_shape), seed=seed, dtype=dtype)


def bench_pair(bn_model: nn.Module, folded_model: nn.Module, sample_shape: Sequence[int], batch_sizes: Sequence[int], *,
               repeat: int = 20, warmup: int = 3, threads: int | None = None, min_sample_seconds: float = 0.02,
               progress: Callable[[int, int], None] | None = None) -> BenchReport:
    """Latency of both models in eval mode under torch.inference_mode, per batch size, interleaved."""
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise InputError(f"--batch-size {','.join(map(str, batch_sizes))}: every batch size must be at least 1")
    bn_model.eval()
    folded_model.eval()
    results = []
    total = repeat * len(batch_sizes)
    with torch_threads(threads) as used_threads, torch.inference_mode():
        for index, batch_size in enumerate(batch_sizes):
            x = seeded_batch(batch_size, sample_shape)
            _check_runs(bn_model, x, "BatchNorm model")
            _check_runs(folded_model, x, "folded model")
            done_before = index * repeat
            timings = time_interleaved(
                {"bn": lambda x=x: bn_model(x), "folded": lambda x=x: folded_model(x)}, repeat=repeat, warmup=warmup,
                min_sample_seconds=min_sample_seconds,
                progress=(lambda done, _total, base=done_before: progress(base + done, total)) if progress else None)
            results.append(BatchResult(batch_size, timings["bn"], timings["folded"], compare(timings["bn"], timings["folded"])))
    return BenchReport(results, tuple(sample_shape), used_threads, repeat, warmup)


def _check_runs(model: nn.Module, x: torch.Tensor, what: str) -> None:
    """One call first, so a shape mismatch is one line naming the input shape, not a traceback mid-timing."""
    try:
        model(x)
    except Exception as exc:  # noqa: BLE001 - the user's model may raise anything on a wrong input shape
        text = str(exc).strip().splitlines()
        raise InputError(f"{what} fails on input of shape {tuple(x.shape)} ({type(exc).__name__}: "
                         f"{text[0][:200] if text else ''}); pass the model's --input-shape") from None


# --------------------------------------------------------------------------- building the pair


@dataclass
class ModelPair:
    """The BN model, its folded twin and what the report should say about them."""

    bn_model: nn.Module
    folded_model: nn.Module
    sample_shape: tuple[int, ...]
    folded: int
    notes: list[str] = field(default_factory=list)


def randomise_batchnorm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters for every BatchNorm (in place).

    A freshly built model has mean 0 / var 1 and gamma 1 / beta 0, so its fold would be
    nearly the identity; trained-looking statistics make the folded model a faithful
    stand-in for a real one.  The ranges are moderate on purpose: timing must not be
    skewed by denormal or overflowing values.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BatchNormBase):
                c = module.num_features
                if module.running_mean is not None and module.running_var is not None:
                    module.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                    module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
                if module.affine:
                    module.weight.copy_(0.5 + torch.rand(c, generator=generator))
                    module.bias.copy_(torch.randn(c, generator=generator) * 0.1)
    return model


def smallnet_pair(checkpoint: str, eps: float | None = None) -> ModelPair:
    """smallNetTrain from `checkpoint` and the smallNetTest that bnstrip folds from it, both float32 eval."""
    from bnstrip.homework.models import SMALLNET_EPS, SMALLNET_INPUT_SHAPE, SMALLNET_PAIRS
    from bnstrip.homework.smallnet import load_smallnet_pair

    bn_model, folded_model, notes = load_smallnet_pair(checkpoint, None, SMALLNET_EPS if eps is None else eps)
    return ModelPair(bn_model, folded_model, tuple(SMALLNET_INPUT_SHAPE), len(SMALLNET_PAIRS), notes)


def arch_pair(spec: str, sample_shape: Sequence[int], checkpoint: str | None = None, seed: int = 0,
              kwargs: dict[str, Any] | None = None) -> ModelPair:
    """A user's model (`MODULE:CALLABLE`, or torchvision:/timm:/ultralytics: by name, with `kwargs`) and its fold.

    Without a checkpoint the model keeps its random initialisation and gets
    randomised BatchNorm statistics, which is enough for timing.
    """
    from bnstrip.arch import import_arch
    from bnstrip.fold import fold_model, load_state_strict

    torch.manual_seed(seed)
    model = import_arch(spec, kwargs)
    notes: list[str] = []
    if checkpoint is not None:
        from bnstrip.io.checkpoint import load_checkpoint

        loaded = load_checkpoint(checkpoint)
        notes += [f"{checkpoint}: {n}" for n in loaded.unwrapped]
        load_state_strict(model, loaded.state_dict, checkpoint)
    else:
        randomise_batchnorm_stats(model, seed)
    model.eval()
    example = seeded_batch(2, sample_shape, seed=seed)
    _check_runs(model, example, f"{spec}")
    result = fold_model(model, (example,))  # folds a copy; `model` stays the BN model
    notes += [f"{bn}: not folded ({reason})" for bn, reason in result.skipped]
    return ModelPair(model, result.model.eval(), tuple(sample_shape), len(result.folded), notes)
