"""Problem 2: mean and variance of an identity-activation MLP under PyTorch's default nn.Linear init.

The law of the default initialisation is read off the installed torch rather than
assumed: a fresh ``nn.Linear`` is drawn under a fixed seed, the same seed is replayed
to get the underlying U[0, 1) draws u, and since torch's ``uniform_(-B, B)`` returns
``-B + 2B u`` the bound B is the least-squares slope of the weights against 2u - 1
(the residual proves the law is exactly that uniform law).  With weights and biases
iid U(-B, B), zero mean, independent of each other and of x:

    E[y_l] = 0,   Var(y_l) = n_{l-1} Var(w_l) Var(y_{l-1}) + Var(b_l),   Var(y_0) = 1,

and Var(w) = Var(b) = B^2 / 3 = 1 / (3 n_{l-1}) for torch's B = 1/sqrt(n_{l-1}), so
Var(y_l) = (Var(y_{l-1}) + 1/n_{l-1}) / 3.  The exact values are `fractions.Fraction`s;
a Monte Carlo run over fresh default-initialised layers checks them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Sequence

import torch

from bnstrip.errors import CheckFailed, InputError

MC_STDERR_BAR = 4.0
MAX_SAMPLES = 100_000_000
MAX_DEPTH = 1000
"""Layers L at most: the exact variances are fractions whose denominators grow like 3^L (477 digits at L = 1000)."""
MAX_LAYER_ENTRIES = 1 << 22  # n_{l-1} * n_l above this would not fit one Monte Carlo draw in memory
_CHUNK_ENTRIES = 1 << 21  # weights drawn per layer and chunk of Monte Carlo samples
_READ_ROWS = 64  # rows of the probe layer used to read the init law


@dataclass(frozen=True)
class InitLaw:
    """The default init of nn.Linear(fan_in, .) as read from torch: weight ~ U(-B_w, B_w), bias ~ U(-B_b, B_b)."""

    fan_in: int
    weight_bound: float
    bias_bound: float
    weight_bound_sq: Fraction  # B_w^2 as an exact fraction (1/fan_in for torch's default)
    bias_bound_sq: Fraction
    max_residual: float  # max |drawn value - (-B + 2B u)|: ~0 proves the uniform law

    @property
    def weight_variance(self) -> Fraction:
        return self.weight_bound_sq / 3

    @property
    def bias_variance(self) -> Fraction:
        return self.bias_bound_sq / 3


@dataclass(frozen=True)
class LayerMoments:
    """Mean and variance of every coordinate of y_l (all coordinates share them)."""

    layer: int
    width: int
    mean: Fraction
    variance: Fraction


@dataclass(frozen=True)
class MonteCarloMoments:
    """Sample mean and variance of the first coordinate of y_L with their standard errors."""

    samples: int
    mean: float
    variance: float
    mean_stderr: float
    variance_stderr: float
    stopped_at_budget: bool = False
    """True when the time budget ended the run before `samples` reached the count asked for."""


@dataclass(frozen=True)
class InitStatsResult:
    layers: list[int]
    laws: list[InitLaw]
    per_layer: list[LayerMoments]
    closed_form_variance: Fraction
    recursion_text: str
    closed_form_text: str
    mc: MonteCarloMoments
    passed: bool
    failures: list[str] = field(default_factory=list)

    @property
    def mean(self) -> Fraction:
        return self.per_layer[-1].mean

    @property
    def variance(self) -> Fraction:
        return self.per_layer[-1].variance


def validate_layers(layers: Sequence[int]) -> list[int]:
    """Widths n_0..n_L: at least two, all positive, each weight matrix small enough to draw."""
    widths = [int(n) for n in layers]
    if len(widths) < 2:
        raise InputError(f"--layers {','.join(map(str, widths))}: give at least n0,n1 (the input width and one layer)")
    if len(widths) - 1 > MAX_DEPTH:
        raise InputError(f"--layers: {len(widths) - 1} layers, more than {MAX_DEPTH}; the exact variances would be "
                         f"fractions of thousands of digits, give at most {MAX_DEPTH + 1} widths")
    for index, width in enumerate(widths):
        if width <= 0:
            raise InputError(f"--layers: width n{index} = {width} is not positive; every width must be >= 1")
    for index in range(1, len(widths)):
        entries = widths[index - 1] * widths[index]
        if entries > MAX_LAYER_ENTRIES:
            raise InputError(f"--layers: layer {index} has {widths[index]}x{widths[index - 1]} = {entries} weights, "
                             f"more than {MAX_LAYER_ENTRIES}; use narrower layers")
    return widths


def validate_samples(samples: int) -> int:
    if not 2 <= samples <= MAX_SAMPLES:
        raise InputError(f"--samples {samples}: the Monte Carlo check needs between 2 and {MAX_SAMPLES} samples")
    return samples


def _as_fraction(value: float, what: str) -> Fraction:
    fraction = Fraction(value).limit_denominator(10_000)
    if abs(float(fraction) - value) > 1e-9 * max(1.0, abs(value)):
        raise CheckFailed(f"torch nn.Linear default init: {what} = {value!r} is not a simple fraction; "
                          "the exact recursion cannot be written for this torch version")
    return fraction


def _slope(values: torch.Tensor, unit: torch.Tensor) -> tuple[float, float]:
    """Fit values = -B + 2B u; return (B, max residual)."""
    signed = 2 * unit - 1
    bound = float((values * signed).sum() / (signed * signed).sum())
    return bound, float((values - bound * signed).abs().max())


def read_init_law(fan_in: int, seed: int = 0) -> InitLaw:
    """Read the law of nn.Linear(fan_in, .)'s default weight and bias init off the installed torch."""
    if fan_in <= 0:
        raise InputError(f"fan_in = {fan_in} is not positive; nn.Linear needs at least one input")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = torch.nn.Linear(fan_in, _READ_ROWS, dtype=torch.float64)
        torch.manual_seed(seed)
        weight_unit = torch.empty(_READ_ROWS, fan_in, dtype=torch.float64).uniform_(0, 1)
        bias_unit = torch.empty(_READ_ROWS, dtype=torch.float64).uniform_(0, 1)
    weight_bound, weight_residual = _slope(probe.weight.detach(), weight_unit)
    bias_bound, bias_residual = _slope(probe.bias.detach(), bias_unit)
    residual = max(weight_residual, bias_residual)
    if residual > 1e-12 * max(weight_bound, bias_bound, 1e-300):
        raise CheckFailed(f"torch nn.Linear({fan_in}, .) default init is not a symmetric uniform law replayable from "
                          f"torch.manual_seed (residual {residual:.3g}); the exact recursion does not apply")
    return InitLaw(fan_in, weight_bound, bias_bound,
                   _as_fraction(weight_bound**2 * fan_in, "B_w^2 * fan_in") / fan_in,
                   _as_fraction(bias_bound**2 * fan_in, "B_b^2 * fan_in") / fan_in, residual)


def exact_moments(layers: Sequence[int], laws: dict[int, InitLaw]) -> list[LayerMoments]:
    """E[y_l] = 0 and Var(y_l) = n_{l-1} Var(w) Var(y_{l-1}) + Var(b) from Var(y_0) = 1, in exact fractions."""
    variance = Fraction(1)
    moments = []
    for index in range(1, len(layers)):
        fan_in = layers[index - 1]
        law = laws[fan_in]
        variance = fan_in * law.weight_variance * variance + law.bias_variance
        moments.append(LayerMoments(index, layers[index], Fraction(0), variance))
    return moments


def closed_form_variance(layers: Sequence[int], laws: dict[int, InitLaw]) -> Fraction:
    """Unrolled recursion: Var(y_L) = prod_l a_l + sum_k c_k prod_{l>k} a_l, a_l = n_{l-1} Var(w_l), c_k = Var(b_k)."""
    depth = len(layers) - 1
    gains = [layers[k - 1] * laws[layers[k - 1]].weight_variance for k in range(1, depth + 1)]
    offsets = [laws[layers[k - 1]].bias_variance for k in range(1, depth + 1)]
    total = Fraction(0)
    later = Fraction(1)  # prod_{l>k} a_l, built from the last layer back (linear, not quadratic, in the depth)
    for k in reversed(range(depth)):
        total += offsets[k] * later
        later *= gains[k]
    return total + later


def _is_torch_default(law: InitLaw) -> bool:
    return law.weight_bound_sq == law.bias_bound_sq == Fraction(1, law.fan_in)


def describe_formulas(layers: Sequence[int], laws: dict[int, InitLaw]) -> tuple[str, str]:
    """Human-readable recursion and closed form (the simple 1/3 form when torch's law is U(+-1/sqrt(fan_in)))."""
    if all(_is_torch_default(laws[n]) for n in layers[:-1]):
        return ("Var(y_l) = n_{l-1} Var(w_l) Var(y_{l-1}) + Var(b_l) = (Var(y_{l-1}) + 1/n_{l-1}) / 3, Var(y_0) = 1",
                "Var(y_L) = 3^-L + sum_{k=0}^{L-1} 3^-(L-k) / n_k")
    return ("Var(y_l) = n_{l-1} B_w^2/3 Var(y_{l-1}) + B_b^2/3, Var(y_0) = 1",
            "Var(y_L) = prod_l a_l + sum_k c_k prod_{l>k} a_l,  a_l = n_{l-1} B_w^2/3,  c_k = B_b^2/3")


class _OutOfTime(Exception):
    """The deadline passed in the middle of a chunk of Monte Carlo samples."""


def _clock() -> float:
    import time

    return time.perf_counter()


def _draw_chunk(widths: Sequence[int], size: int, deadline: float | None) -> torch.Tensor:
    """y_L[0] of `size` fresh networks; _OutOfTime as soon as the deadline passes (checked after every layer)."""
    y = torch.randn(size, widths[0], dtype=torch.float64)
    for k in range(1, len(widths)):
        layer = torch.nn.Linear(widths[k - 1], size * widths[k], dtype=torch.float64)
        weight = layer.weight.view(size, widths[k], widths[k - 1])
        bias = layer.bias.view(size, widths[k])
        y = torch.einsum("soi,si->so", weight, y) + bias
        if deadline is not None and _clock() > deadline:
            raise _OutOfTime
    return y[:, 0]


def monte_carlo_moments(layers: Sequence[int], samples: int, seed: int,
                        progress: Callable[[int, int], None] | None = None,
                        deadline: float | None = None) -> MonteCarloMoments:
    """Sample y_L[0] over fresh default-initialised nn.Linear layers and a fresh x ~ N(0, I) per sample.

    A chunk of S samples uses one fresh ``nn.Linear(n_{l-1}, S * n_l)`` per layer: its init law depends only
    on fan_in = n_{l-1}, so its S row blocks are S independent fresh ``nn.Linear(n_{l-1}, n_l)`` drawn by
    torch's own reset_parameters, without constructing S modules.  With a `deadline` (a time.perf_counter()
    value) chunks start at 16 samples and double, the run stops at the deadline with the samples of the
    chunks it finished (`stopped_at_budget`), and fewer than two is an InputError.
    """
    widths = validate_layers(layers)
    validate_samples(samples)
    widest = max(widths[k - 1] * widths[k] for k in range(1, len(widths)))
    largest = max(1, min(samples, _CHUNK_ENTRIES // widest))
    chunk = largest if deadline is None else min(largest, 16)
    outputs: list[torch.Tensor] = []
    done, stopped = 0, False
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        while done < samples:
            size = min(chunk, samples - done)
            try:
                outputs.append(_draw_chunk(widths, size, deadline))
            except _OutOfTime:
                stopped = True
                break
            done += size
            chunk = min(chunk * 2, largest)
            if progress is not None:
                progress(done, samples)
    if done < (MIN_BUDGET_SAMPLES if stopped else 2):
        raise InputError(f"--budget: the time budget ran out after {done} Monte Carlo samples of this "
                         f"{len(widths) - 1}-layer network, fewer than the {MIN_BUDGET_SAMPLES} a check needs; raise "
                         "--budget, or give --samples or fewer layers")
    values = torch.cat(outputs)
    mean = float(values.mean())
    centred = values - mean
    variance = float(centred.square().sum() / (done - 1))
    fourth = float(centred.pow(4).mean())
    return MonteCarloMoments(done, mean, variance, math.sqrt(variance / done),
                             math.sqrt(max(fourth - variance**2, 0.0) / done), stopped)


DEFAULT_SAMPLES = 100_000
"""Monte Carlo samples when the time budget allows them (small networks)."""
DEFAULT_BUDGET_SECONDS = 10.0
"""Time budget of the Monte Carlo check: with `import torch` and the exact part a run stays within about 15 s."""
MIN_BUDGET_SAMPLES = 100
"""Fewest samples a budget picks: below this the standard error says little."""


def samples_for_budget(layers: Sequence[int], seconds: float = DEFAULT_BUDGET_SECONDS, seed: int = 0,
                       cap: int = DEFAULT_SAMPLES) -> int:
    """How many Monte Carlo samples fit `seconds` on this machine, at most `cap`, at least MIN_BUDGET_SAMPLES.

    A pilot run (growing x4 until it takes 0.2 s) measures the cost of one sample; its draws are not reused,
    so the pilot costs at most about 1 s.  The standard error grows as 1/sqrt(samples) accordingly.
    """
    import time

    widths = validate_layers(layers)
    pilot = 2
    while True:
        started = time.perf_counter()
        monte_carlo_moments(widths, pilot, seed)
        elapsed = time.perf_counter() - started
        if elapsed >= 0.2 or pilot >= cap:
            break
        pilot *= 4
    per_sample = elapsed / pilot
    fitting = int(max(seconds - elapsed, 0.0) / per_sample) if per_sample > 0 else cap
    return max(min(fitting, cap), min(MIN_BUDGET_SAMPLES, cap))


def in_stderrs(difference: float, stderr: float) -> float:
    """|difference| in standard errors (infinite for a zero standard error, e.g. a sample of a few draws)."""
    return abs(difference) / stderr if stderr > 0 else math.inf


def init_stats(layers: Sequence[int], samples: int, seed: int = 0,
               progress: Callable[[int, int], None] | None = None, budget: float | None = None) -> InitStatsResult:
    """Exact moments of y_1..y_L under torch's default init, checked by Monte Carlo (fail beyond 4 standard errors).

    With a `budget` (seconds) the Monte Carlo run stops when it is spent (see monte_carlo_moments' deadline).
    """
    widths = validate_layers(layers)
    validate_samples(samples)
    laws = {n: read_init_law(n, seed) for n in sorted(set(widths[:-1]))}
    per_layer = exact_moments(widths, laws)
    closed = closed_form_variance(widths, laws)
    failures = []
    if closed != per_layer[-1].variance:
        failures.append(f"closed form {closed} != recursion {per_layer[-1].variance}")
    recursion_text, closed_text = describe_formulas(widths, laws)
    mc = monte_carlo_moments(widths, samples, seed, progress, None if budget is None else _clock() + budget)
    exact_variance = float(per_layer[-1].variance)
    if abs(mc.mean - 0.0) > MC_STDERR_BAR * mc.mean_stderr:
        failures.append(f"Monte Carlo mean {mc.mean:.4g} is {in_stderrs(mc.mean, mc.mean_stderr):.1f} standard "
                        "errors from 0")
    if abs(mc.variance - exact_variance) > MC_STDERR_BAR * mc.variance_stderr:
        distance = in_stderrs(mc.variance - exact_variance, mc.variance_stderr)
        failures.append(f"Monte Carlo variance {mc.variance:.4g} is {distance:.1f} standard errors from the exact "
                        f"{exact_variance:.4g}")
    return InitStatsResult(widths, [laws[n] for n in sorted(laws)], per_layer, closed, recursion_text, closed_text,
                           mc, not failures, failures)
