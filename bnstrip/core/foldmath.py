"""Pure tensor maths of BatchNorm folding (no modules, no I/O).

An eval-mode BatchNorm is a per-channel affine map  y = x * s + t  with
s = gamma / sqrt(var + eps) and t = beta - mean * s.  Folding it into the layer
that produces x scales that layer's output channels by s and maps its bias b to
b * s + t; folding it into the layer that consumes y scales the consumer's
input channels by s and adds W applied to t to its bias.  Everything is computed
in float64 and cast back to the weight's dtype once, so half-precision
checkpoints lose nothing to intermediate rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from bnstrip.errors import InputError


@dataclass(frozen=True)
class BNStats:
    """What an eval-mode BatchNorm needs; weight/bias are None for affine=False."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def bn_scale_shift(stats: BNStats, name: str = "BatchNorm") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (s, t) in float64 such that BN(x) = x * s + t; validates the statistics."""
    mean = stats.running_mean.detach().to(torch.float64).reshape(-1)
    var = stats.running_var.detach().to(torch.float64).reshape(-1)
    c = mean.numel()
    if var.numel() != c:
        raise InputError(f"{name}: running_var has {var.numel()} channels but running_mean has {c}; the checkpoint is inconsistent")
    for label, tensor in (("weight", stats.weight), ("bias", stats.bias)):
        if tensor is not None and tensor.numel() != c:
            raise InputError(f"{name}: {label} has {tensor.numel()} channels but running_mean has {c}; the checkpoint is inconsistent")
    if not torch.isfinite(mean).all():
        raise InputError(f"{name}: running_mean has NaN/Inf values; retrain or recalibrate the BatchNorm statistics")
    if not torch.isfinite(var).all():
        raise InputError(f"{name}: running_var has NaN/Inf values; retrain or recalibrate the BatchNorm statistics")
    if (var < 0).any():
        raise InputError(f"{name}: running_var has negative values (min {var.min().item():.3g}); the statistics are corrupt, recalibrate them")
    if not math.isfinite(stats.eps) or stats.eps < 0:
        raise InputError(f"{name}: eps={stats.eps} is not a finite non-negative number; pass a valid --eps")
    denom = var + stats.eps
    if (denom <= 0).any():
        raise InputError(f"{name}: running_var + eps is 0 for some channel (eps={stats.eps}); pass a positive --eps")
    gamma = torch.ones_like(mean) if stats.weight is None else stats.weight.detach().to(torch.float64).reshape(-1)
    beta = torch.zeros_like(mean) if stats.bias is None else stats.bias.detach().to(torch.float64).reshape(-1)
    if not (torch.isfinite(gamma).all() and torch.isfinite(beta).all()):
        raise InputError(f"{name}: weight/bias has NaN/Inf values; the checkpoint is corrupt")
    scale = gamma / torch.sqrt(denom)
    return scale, beta - mean * scale


def _cast_back(tensor64: torch.Tensor, dtype: torch.dtype, name: str, what: str, allow_overflow: bool) -> torch.Tensor:
    out = tensor64.to(dtype)
    if all_finite(out):  # then the float64 values were finite too, and nothing overflowed
        return out
    if not all_finite(tensor64):
        raise InputError(f"{name}: folded {what} is not finite; the BatchNorm statistics are degenerate, recalibrate them")
    if not allow_overflow:
        raise InputError(
            f"{name}: folded {what} overflows {str(dtype).replace('torch.', '')} (max |value| {tensor64.abs().max().item():.3g}); "
            "save the checkpoint in a wider dtype (float32/float64) or pass --allow-overflow"
        )
    return out


def fold_into_producer(weight: torch.Tensor, bias: torch.Tensor | None, stats: BNStats, *, out_axis: int = 0,
                       groups: int = 1, name: str = "layer", allow_overflow: bool = False,
                       scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold BN that follows a conv/linear into it: returns (W', b') with W' scaled per output channel.

    `out_axis` is 0 for Conv/Linear weights (out, in, ...) and 1 for ConvTranspose
    weights (in, out/groups, ...), where `groups` says how output channels are laid out.
    `scale_shift`: bn_scale_shift(stats) where the caller already computed (and so validated) it.
    """
    scale, shift = scale_shift if scale_shift is not None else bn_scale_shift(stats, name)
    if out_axis == 0:
        out_channels = weight.shape[0]
        if out_channels != scale.numel():
            raise InputError(f"{name}: produces {out_channels} channels but its BatchNorm has {scale.numel()}; they cannot be folded")
        w_cast = _scale_rows_blockwise(weight.detach(), scale, name, allow_overflow)
    elif out_axis == 1:
        w = weight.detach().to(torch.float64)
        in_channels, per_group = w.shape[0], w.shape[1]
        out_channels = per_group * groups
        if out_channels != scale.numel() or in_channels % groups:
            raise InputError(f"{name}: produces {out_channels} channels but its BatchNorm has {scale.numel()}; they cannot be folded")
        grouped = w.reshape(groups, in_channels // groups, per_group, *w.shape[2:])
        s = scale.reshape(groups, 1, per_group, *([1] * (w.dim() - 2)))
        w_cast = _cast_back((grouped * s).reshape(w.shape), weight.dtype, name, "weight", allow_overflow)
    else:
        raise ValueError(f"out_axis must be 0 or 1, not {out_axis}")
    b = torch.zeros(out_channels, dtype=torch.float64, device=scale.device) if bias is None else bias.detach().to(torch.float64).reshape(-1)
    b_folded = b * scale + shift
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return w_cast, _cast_back(b_folded, bias_dtype, name, "bias", allow_overflow)


_BLOCK_ELEMENTS = 1 << 18
"""float64 elements per block of output channels (2 MB, cache-sized): a 16M-parameter layer is never held in float64."""


def all_finite(tensor: torch.Tensor) -> bool:
    """One reduction pass, no temporaries (torch.isfinite would allocate |x| and two masks of the tensor's size)."""
    if tensor.numel() == 0:
        return True
    if tensor.is_floating_point() and tensor.element_size() == 1:  # float8: no aminmax kernel; widening is exact
        tensor = tensor.float()
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))  # aminmax propagates NaN


def _scale_rows_blockwise(weight: torch.Tensor, scale: torch.Tensor, name: str, allow_overflow: bool) -> torch.Tensor:
    """weight * scale (per output channel, axis 0) computed in float64 block by block and cast once.

    Bit-identical to casting the whole float64 product (each element is one float64
    multiply and one rounding), without a full float64 copy (8 bytes a parameter).
    A non-finite float64 value stays non-finite when cast, so one check of the result
    suffices; if it fails, the layer goes through _cast_back, whose errors (and
    --allow-overflow result) are exactly the unblocked ones.
    """
    out = torch.empty_like(weight)
    rows = max(1, _BLOCK_ELEMENTS // max(1, weight[0].numel())) if weight.shape[0] else 1
    trailing = [1] * (weight.dim() - 1)
    buffer = torch.empty((min(rows, weight.shape[0]), *weight.shape[1:]), dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], rows):
        block = buffer[:min(rows, weight.shape[0] - start)]
        # float64 is the common dtype, so the multiply runs in float64 exactly as weight.to(float64) * scale would
        torch.mul(weight[start:start + rows], scale[start:start + rows].reshape(-1, *trailing), out=block)
        out[start:start + rows].copy_(block)
    if all_finite(out):
        return out
    return _cast_back(weight.to(torch.float64) * scale.reshape(-1, *trailing), weight.dtype, name, "weight", allow_overflow)


def _scale_columns_blockwise(weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, name: str,
                             allow_overflow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * scale per input channel (axis 1), cast once; weight applied to shift, float64) for groups=1.

    One float64 block of output rows at a time serves both (as _scale_rows_blockwise): no float64 copy of the
    layer, and one pass over it where the whole-tensor form made four.
    """
    out = torch.empty_like(weight)
    extra = torch.empty(weight.shape[0], dtype=torch.float64, device=weight.device)
    s = scale.reshape(1, -1, *([1] * (weight.dim() - 2)))
    rows = max(1, _BLOCK_ELEMENTS // max(1, weight[0].numel())) if weight.shape[0] else 1
    buffer = torch.empty((min(rows, weight.shape[0]), *weight.shape[1:]), dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], rows):
        block = buffer[:min(rows, weight.shape[0] - start)]
        block.copy_(weight[start:start + rows])
        per_channel = block if block.dim() == 2 else block.flatten(2).sum(-1)  # a conv's taps all see the same shift
        torch.mv(per_channel, shift, out=extra[start:start + rows])
        block.mul_(s)
        out[start:start + rows].copy_(block)
    if all_finite(out):
        return out, extra
    return _cast_back(weight.to(torch.float64) * s, weight.dtype, name, "weight", allow_overflow), extra


def fold_into_consumer(weight: torch.Tensor, bias: torch.Tensor | None, stats: BNStats, *, groups: int = 1,
                       name: str = "layer", allow_overflow: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold BN that precedes a Linear or an unpadded Conv (weight (out, in/groups, ...)) into it.

    W(x*s + t) + b = (W*s) x + (W t + b): scale the input channels, and add W applied to t.
    Exact for a conv only when every output reads no padding (padding 0), which the caller checks.
    """
    scale, shift = bn_scale_shift(stats, name)
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    if in_per_group * groups != scale.numel() or out_channels % groups:
        raise InputError(f"{name}: takes {in_per_group * groups} input channels but the BatchNorm before it has {scale.numel()}; they cannot be folded")
    b = torch.zeros(out_channels, dtype=torch.float64, device=scale.device) if bias is None else bias.detach().to(torch.float64).reshape(-1)
    bias_dtype = weight.dtype if bias is None else bias.dtype
    if groups == 1:
        w_cast, extra = _scale_columns_blockwise(weight.detach(), scale, shift, name, allow_overflow)
        return w_cast, _cast_back(b + extra, bias_dtype, name, "bias", allow_overflow)
    w = weight.detach().to(torch.float64)
    out_per_group = out_channels // groups
    spatial = [1] * (w.dim() - 2)
    s = scale.reshape(groups, 1, in_per_group, *spatial)
    t = shift.reshape(groups, 1, in_per_group, *spatial)
    grouped = w.reshape(groups, out_per_group, in_per_group, *w.shape[2:])
    w_folded = (grouped * s).reshape(w.shape)
    extra = (grouped * t).sum(dim=tuple(range(2, grouped.dim()))).reshape(out_channels)
    return (_cast_back(w_folded, weight.dtype, name, "weight", allow_overflow),
            _cast_back(b + extra, bias_dtype, name, "bias", allow_overflow))


def bn_stats_from_state(state: Mapping[str, torch.Tensor], prefix: str, eps: float) -> BNStats:
    """Read a BatchNorm's tensors from a state_dict (weight/bias absent means affine=False)."""
    try:
        mean, var = state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"]
    except KeyError:
        raise InputError(f"{prefix}: BatchNorm has no running_mean/running_var in the checkpoint; it cannot be folded") from None
    return BNStats(mean, var, state.get(f"{prefix}.weight"), state.get(f"{prefix}.bias"), eps)


def fold_state_dict(state: Mapping[str, torch.Tensor], pairs: list[tuple[str, str]], eps: float,
                    allow_overflow: bool = False) -> dict[str, torch.Tensor]:
    """Fold each (producer, bn) pair of a Conv/Linear state_dict; drop the BN tensors.

    Keys that belong to no pair are passed through untouched (same tensor objects).
    """
    out = dict(state)
    for producer, bn in pairs:
        weight_key, bias_key = f"{producer}.weight", f"{producer}.bias"
        if weight_key not in state:
            raise InputError(f"{producer}: no '{weight_key}' in the checkpoint; it does not match the model")
        stats = bn_stats_from_state(state, bn, eps)
        w, b = fold_into_producer(state[weight_key], state.get(bias_key), stats, name=f"{producer} + {bn}",
                                  allow_overflow=allow_overflow)
        out[weight_key], out[bias_key] = w, b
        for suffix in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            out.pop(f"{bn}.{suffix}", None)
    return out


def cast_folded(tensor64: torch.Tensor, dtype: torch.dtype, name: str, what: str = "weight",
                allow_overflow: bool = False) -> torch.Tensor:
    """The single cast back from float64, with the same overflow/finiteness checks the fold functions use.

    Lets a caller chain several folds into one layer in float64 and round once at the end.
    """
    return _cast_back(tensor64, dtype, name, what, allow_overflow)


def identity_running_var(num_features: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """running_var that makes `var + eps` round to exactly 1, so an eval BatchNorm computes x * 1 + beta.

    1 - eps rounded to `dtype` is within half an ulp of 1 - eps, and adding eps back rounds to 1.0 in the
    same precision (float32/float64). float16/bfloat16 storage cannot hold 1 - eps that finely (the kernel
    adds eps in float32), so there the scale is 1 only to within about eps/2 plus half a storage ulp.
    """
    if not math.isfinite(eps) or not 0 <= eps < 1:
        raise InputError(f"eps={eps}: an identity BatchNorm needs 0 <= eps < 1; pass a valid --eps")
    return torch.full((num_features,), 1.0 - eps, dtype=torch.float64).to(dtype)
