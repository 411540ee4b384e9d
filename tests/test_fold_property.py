"""Property: random conv/linear + BatchNorm shapes and statistics either fold within tolerance or are refused
with a justified reason (InputError) -- never folded wrong.

The ground truth is `nn.Sequential(layer, bn).eval()` (or `(bn, linear)`) run in float64 on the
same values; the tolerance is a rounding bound, a few units of the storage dtype's epsilon times
the magnitude of the terms that are summed (so cancellation cannot hide an error, nor fake one).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from bnstrip.errors import InputError
from bnstrip.core.foldmath import BNStats, fold_into_consumer, fold_into_producer

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
CORRUPTIONS = [None, None, None, None, "nan_var", "inf_var", "negative_var", "zero_var", "nan_mean", "inf_gamma",
               "huge_gamma", "tiny_var"]

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def bn_case(draw: st.DrawFn, channels: int) -> dict:
    """BatchNorm statistics over wide magnitudes, sometimes with one corrupted channel."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    var_lo, var_hi = sorted(draw(st.tuples(st.integers(-8, 6), st.integers(-8, 6))))
    var = 10 ** (torch.rand(channels, generator=gen, dtype=torch.float64) * (var_hi - var_lo) + var_lo)
    mean = torch.randn(channels, generator=gen, dtype=torch.float64) * 10 ** draw(st.integers(-2, 4))
    affine = draw(st.booleans())
    gamma = torch.randn(channels, generator=gen, dtype=torch.float64) * 10 ** draw(st.integers(-3, 3)) if affine else None
    beta = torch.randn(channels, generator=gen, dtype=torch.float64) * 10 ** draw(st.integers(-3, 3)) if affine else None
    corruption = draw(st.sampled_from(CORRUPTIONS))
    index = draw(st.integers(0, channels - 1))
    if corruption == "nan_var":
        var[index] = math.nan
    elif corruption == "inf_var":
        var[index] = math.inf
    elif corruption == "negative_var":
        var[index] = -0.5
    elif corruption in ("zero_var", "tiny_var"):
        var[index] = 0.0 if corruption == "zero_var" else 1e-30
    elif corruption == "nan_mean":
        mean[index] = math.nan
    elif corruption in ("inf_gamma", "huge_gamma") and gamma is not None:
        gamma[index] = math.inf if corruption == "inf_gamma" else 1e30
    eps = draw(st.sampled_from([0.0, 1e-5, 1e-3]))
    return {"mean": mean, "var": var, "gamma": gamma, "beta": beta, "eps": eps}


def stats_in(case: dict, dtype: torch.dtype) -> BNStats:
    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dtype)
    return BNStats(cast(case["mean"]), cast(case["var"]), cast(case["gamma"]), cast(case["beta"]), case["eps"])


def load_bn(bn: nn.modules.batchnorm._BatchNorm, stats: BNStats) -> None:
    """The reference BatchNorm, in float64, holding exactly the (dtype-rounded) statistics."""
    with torch.no_grad():
        bn.running_mean.copy_(stats.running_mean.double())
        bn.running_var.copy_(stats.running_var.double())
        if stats.weight is not None:
            bn.weight.copy_(stats.weight.double())
            bn.bias.copy_(stats.bias.double())
    bn.eps = stats.eps


def refusal_is_justified(message: str, stats: BNStats, folded64_max: float, dtype: torch.dtype) -> bool:
    """Each refusal must point at something really wrong with these values."""
    mean, var = stats.running_mean.double(), stats.running_var.double()
    params = [t.double() for t in (stats.weight, stats.bias) if t is not None]
    if "running_var has negative" in message:
        return bool((var < 0).any())
    if "running_var has nan/inf" in message.lower():
        return not bool(torch.isfinite(var).all())
    if "running_mean has nan/inf" in message.lower():
        return not bool(torch.isfinite(mean).all())
    if "weight/bias has nan/inf" in message.lower():
        return any(not bool(torch.isfinite(t).all()) for t in params)
    if "running_var + eps is 0" in message:
        return bool(((var + stats.eps) == 0).any())
    if "overflows" in message:
        return folded64_max > torch.finfo(dtype).max
    if "is not finite" in message:
        return not math.isfinite(folded64_max)
    return False


def exact_fold_magnitude(weight: torch.Tensor, bias: torch.Tensor | None, stats: BNStats, out_axis: int,
                         groups: int) -> float:
    """max |folded weight or bias| computed naively in float64 (inf or NaN when it does not exist)."""
    var = stats.running_var.double() + stats.eps
    gamma = torch.ones_like(var) if stats.weight is None else stats.weight.double()
    beta = torch.zeros_like(var) if stats.bias is None else stats.bias.double()
    scale = gamma / var.sqrt()
    b = torch.zeros_like(var) if bias is None else bias.double()
    folded_bias = b * scale + beta - stats.running_mean.double() * scale
    w = weight.double()
    if out_axis == 0:
        folded_weight = w * scale.reshape(-1, *[1] * (w.dim() - 1))
    else:  # ConvTranspose: (in, out/groups, ...) with output channel = group * out/groups + j
        per_group = w.shape[1]
        grouped = w.reshape(groups, w.shape[0] // groups, per_group, *w.shape[2:])
        folded_weight = grouped * scale.reshape(groups, 1, per_group, *[1] * (w.dim() - 2))
    return float(torch.cat([folded_weight.abs().flatten(), folded_bias.abs()]).max())


@st.composite
def producer_case(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(["conv", "convT", "linear"]))
    groups = draw(st.sampled_from([1, 2])) if kind != "linear" else 1
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    return {"kind": kind, "groups": groups, "cin": cin, "cout": cout, "k": draw(st.integers(1, 3)),
            "bias": draw(st.booleans()), "dtype": draw(st.sampled_from(DTYPES)), "bn": draw(bn_case(cout)),
            "seed": draw(st.integers(0, 2**31 - 1))}


def build_producer(case: dict) -> tuple[nn.Module, nn.modules.batchnorm._BatchNorm, torch.Tensor, int]:
    torch.manual_seed(case["seed"])
    k, g = case["k"], case["groups"]
    if case["kind"] == "conv":
        layer = nn.Conv2d(case["cin"], case["cout"], k, padding=k // 2, groups=g, bias=case["bias"])
        bn, x, out_axis = nn.BatchNorm2d(case["cout"]), torch.rand(2, case["cin"], 5, 5), 0
    elif case["kind"] == "convT":
        layer = nn.ConvTranspose2d(case["cin"], case["cout"], k, stride=2, groups=g, bias=case["bias"])
        bn, x, out_axis = nn.BatchNorm2d(case["cout"]), torch.rand(2, case["cin"], 4, 4), 1
    else:
        layer = nn.Linear(case["cin"], case["cout"], bias=case["bias"])
        bn, x, out_axis = nn.BatchNorm1d(case["cout"]), torch.rand(3, case["cin"]), 0
    return layer, bn, x, out_axis


def with_params(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """An independent copy of `layer` (same stride, padding, groups) holding these parameters."""
    clone = copy.deepcopy(layer)
    clone.weight = nn.Parameter(weight)
    clone.bias = None if bias is None else nn.Parameter(bias)
    return clone


def rounding_bound(terms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Error allowed for an output that is a sum of terms of this total magnitude, stored in `dtype`."""
    return 16 * (torch.finfo(dtype).eps + torch.finfo(torch.float64).eps) * terms + 1e-300


@SETTINGS
@given(producer_case())
def test_producer_fold_matches_sequential_or_is_refused_for_a_reason(case: dict) -> None:
    dtype = case["dtype"]
    layer, bn, x, out_axis = build_producer(case)
    weight = layer.weight.detach().to(dtype)
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    stats = stats_in(case["bn"], dtype)
    try:
        w_folded, b_folded = fold_into_producer(weight, bias, stats, out_axis=out_axis, groups=case["groups"], name="layer")
    except InputError as exc:
        message = str(exc)
        assert message and "\n" not in message
        assert refusal_is_justified(message, stats, exact_fold_magnitude(weight, bias, stats, out_axis, case["groups"]), dtype), message
        event(f"refused: {message.split(': ', 1)[1][:28]}")
        return
    event("folded")
    assert w_folded.dtype == dtype and w_folded.shape == weight.shape and b_folded.shape == (case["cout"],)
    assert torch.isfinite(w_folded).all() and torch.isfinite(b_folded).all(), "a fold may not invent inf/NaN"

    # ground truth: the unfolded pair in float64, holding exactly the dtype-rounded values
    layer = layer.double()
    with torch.no_grad():
        layer.weight.copy_(weight.double())
        if bias is not None:
            layer.bias.copy_(bias.double())
    bn = bn.double()
    load_bn(bn, stats)
    x = x.double()
    with torch.no_grad():
        reference = nn.Sequential(layer, bn).eval()(x)
        got = with_params(layer, w_folded.double(), b_folded.double())(x)
        # magnitude of every summed term: |W| |x| |s| + |b s| + |mean s| + |beta|
        var = stats.running_var.double() + stats.eps
        gamma = torch.ones_like(var) if stats.weight is None else stats.weight.double()
        s = (gamma / var.sqrt()).abs()
        beta = torch.zeros_like(var) if stats.bias is None else stats.bias.double().abs()
        b = torch.zeros_like(var) if bias is None else bias.double().abs()
        abs_layer = with_params(layer, layer.weight.abs(), None)
        channel_shape = [1, -1] + [1] * (x.dim() - 2)
        terms = (abs_layer(x.abs()) * s.reshape(channel_shape)
                 + (b * s + stats.running_mean.double().abs() * s + beta).reshape(channel_shape))
    error = (got - reference).abs()
    assert (error <= rounding_bound(terms, dtype)).all(), f"max error {error.max():.3g} vs bound {rounding_bound(terms, dtype).min():.3g}"


@st.composite
def consumer_case(draw: st.DrawFn) -> dict:
    cin = draw(st.integers(1, 6))
    return {"cin": cin, "cout": draw(st.integers(1, 5)), "bias": draw(st.booleans()), "dtype": draw(st.sampled_from(DTYPES)),
            "bn": draw(bn_case(cin)), "seed": draw(st.integers(0, 2**31 - 1))}


@SETTINGS
@given(consumer_case())
def test_consumer_fold_matches_sequential_or_is_refused_for_a_reason(case: dict) -> None:
    """BatchNorm1d then Linear: fold the BN into the Linear that reads it."""
    dtype = case["dtype"]
    torch.manual_seed(case["seed"])
    linear = nn.Linear(case["cin"], case["cout"], bias=case["bias"])
    weight = linear.weight.detach().to(dtype)
    bias = None if linear.bias is None else linear.bias.detach().to(dtype)
    stats = stats_in(case["bn"], dtype)
    try:
        w_folded, b_folded = fold_into_consumer(weight, bias, stats, name="linear")
    except InputError as exc:
        message = str(exc)
        var = stats.running_var.double().clamp_min(0) + stats.eps
        gamma = torch.ones_like(var) if stats.weight is None else stats.weight.double()
        s = gamma / var.sqrt()
        beta = torch.zeros_like(var) if stats.bias is None else stats.bias.double()
        t = beta - stats.running_mean.double() * s
        magnitude = float(torch.maximum((weight.double() * s).abs().max(), (weight.double() @ t).abs().max()))
        assert message and "\n" not in message
        assert refusal_is_justified(message, stats, magnitude, dtype), message
        event(f"refused: {message.split(': ', 1)[1][:28]}")
        return
    event("folded")
    assert torch.isfinite(w_folded).all() and torch.isfinite(b_folded).all(), "a fold may not invent inf/NaN"
    bn = nn.BatchNorm1d(case["cin"]).double()
    load_bn(bn, stats)
    linear = linear.double()
    with torch.no_grad():
        linear.weight.copy_(weight.double())
        if bias is not None:
            linear.bias.copy_(bias.double())
        x = torch.rand(4, case["cin"], dtype=torch.float64)
        reference = nn.Sequential(bn, linear).eval()(x)
        got = F.linear(x, w_folded.double(), b_folded.double())
        var = stats.running_var.double() + stats.eps
        gamma = torch.ones_like(var) if stats.weight is None else stats.weight.double()
        s = (gamma / var.sqrt()).abs()
        beta = torch.zeros_like(var) if stats.bias is None else stats.bias.double().abs()
        shifted = x.abs() * s + stats.running_mean.double().abs() * s + beta
        terms = F.linear(shifted, linear.weight.abs()) + (0 if bias is None else bias.double().abs())
    error = (got - reference).abs()
    assert (error <= rounding_bound(terms, dtype)).all(), f"max error {error.max():.3g}"
