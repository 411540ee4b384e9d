"""How far one rounding of a model's foldable parameters moves its outputs: the scale of the proof rule (issue 18).

A fold is allowed to change exactly one thing: each folded parameter is rounded once to its
dtype (W' = W s, b' = b s + t, computed in float64). So the measure of "exact" is how far the
original's outputs move, evaluated in float64, when the parameters that the fold touches (the
producer's or consumer's weight and bias, the BatchNorm's gamma, beta, running mean and
variance) are each moved by one unit in the last place of their own dtype, with a seeded random
sign per element. One ulp is twice the largest rounding error (half an ulp), and in float64 it
is the smallest step there is.

What rounds depends on the dtype. A float32 or half-precision fold is computed in float64 and
rounded once, so only its results round: the folded weight W s (moved exactly as W moved one ulp,
since the move is relative) and the folded bias b s + t (moved as the BatchNorm's output moves
when its running_mean shifts by one ulp of that bias over s). A float64 fold is computed in
float64 itself, so each of its inputs rounds: the layer's weight and bias and every tensor of the
BatchNorm move one ulp (which is what a large mean cancelled by a large shift costs). The outputs of a well-conditioned model hardly move; those of an
ill-conditioned one (tiny running_var, huge gamma, statistics far from the data) move as much
as its exact fold does, since both come from the same cancellation. `core.compare.tolerance_for`
turns the measure into the tolerance.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from bnstrip.core.compare import float64_outputs, output_gap
from bnstrip.core.foldmath import BNStats, bn_scale_shift
from bnstrip.errors import InputError

StatsOf = Callable[[nn.Module], BNStats]

DRAWS = 2
"""Random sign patterns tried; the largest move counts."""


def _ulps(values64: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """One ulp of `dtype` at each of the float64 `values64`, with a random sign; 0 where a value is 0 (rounding a
    zero gives zero, so a fold never moves one)."""
    _, exponent = torch.frexp(values64)  # |v| in [2**(e-1), 2**e): one ulp is eps * 2**(e-1)
    ulp = torch.ldexp(torch.full_like(values64, torch.finfo(dtype).eps), exponent - 1)
    sign = torch.randint(0, 2, values64.shape, generator=generator, dtype=torch.int64).to(torch.float64).mul_(2).sub_(1)
    return torch.where(values64 == 0, torch.zeros_like(values64), sign * ulp)


def one_ulp_moved(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`tensor` in float64, each nonzero element moved by one ulp of the tensor's own dtype, up or down at random."""
    wide = tensor.detach().to(torch.float64)
    return wide + _ulps(wide, tensor.dtype, generator)


def _module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _folded_bias_move(stats: BNStats, tensors: dict[str, torch.Tensor], names: tuple[str, str], consumer: bool,
                      generator: torch.Generator) -> tuple[str, torch.Tensor] | None:
    """(name, moved tensor) that moves the outputs as one ulp of the folded bias does: the BatchNorm's running_mean
    shifted by -ulp/s (its output moves by +ulp) for a fold into the layer before, the layer's own bias for a fold
    into the layer after. None where the channels do not line up (the weight's ulp still counts)."""
    layer_name, bn_name = names
    weight, bias = tensors[f"{layer_name}.weight"], tensors.get(f"{layer_name}.bias")
    try:
        s, t = bn_scale_shift(stats, bn_name)
        if consumer:
            if bias is None:
                return None
            w64 = weight.detach().to(torch.float64)
            own = bias.detach().to(torch.float64)
            folded = own + (w64 * t.reshape(1, -1, *([1] * (w64.dim() - 2)))).flatten(1).sum(1)
            return f"{layer_name}.bias", own + _ulps(folded, weight.dtype, generator)
        key = f"{bn_name}.running_mean"
        if key not in tensors:
            return None
        b = bias.detach().to(torch.float64) if bias is not None and bias.numel() == s.numel() else torch.zeros_like(s)
        move = _ulps(b * s + t, weight.dtype, generator)
        safe_s = torch.where(s == 0, torch.ones_like(s), s)
        return key, tensors[key].detach().to(torch.float64) - torch.where(s == 0, torch.zeros_like(s), move / safe_s)
    except (RuntimeError, ValueError, TypeError, AttributeError, InputError):  # shapes that do not line up
        return None


def fold_rounding_overrides(model: nn.Module, folded: Sequence[tuple[str, str]], consumers: set[str],
                            stats_of: StatsOf, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Float64 replacements for tensors of `model` that move its outputs as rounding the folded parameters once
    does: each folded layer's weight one ulp (relative, so W s moves one ulp too) and each folded bias one ulp.
    `consumers` are the BatchNorms folded into the layer after them; `stats_of` reads a BatchNorm's statistics."""
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    overrides: dict[str, torch.Tensor] = {}
    for layer_name, bn_name in folded:
        layer, bn = _module(model, layer_name), _module(model, bn_name)
        key = f"{layer_name}.weight"
        if layer is None or bn is None or key not in tensors or not tensors[key].is_floating_point():
            continue
        if tensors[key].dtype == torch.float64:  # folded in its own precision: every input of the fold rounds
            for name in _float_tensors(layer, layer_name) + _float_tensors(bn, bn_name):
                overrides.setdefault(name, one_ulp_moved(tensors[name], generator))
            continue
        overrides.setdefault(key, one_ulp_moved(tensors[key], generator))
        try:
            stats = stats_of(bn)
        except (AttributeError, TypeError, ValueError, InputError):
            continue
        moved = _folded_bias_move(stats, tensors, (layer_name, bn_name), bn_name in consumers, generator)
        if moved is not None and moved[0] not in overrides:
            overrides[moved[0]] = moved[1]
    return overrides


def _float_tensors(module: nn.Module, prefix: str) -> list[str]:
    """Full names of the module's own floating-point parameters and buffers."""
    return [name for kind in (module.named_parameters, module.named_buffers)
            for name, tensor in kind(prefix=prefix, recurse=False) if tensor is not None and tensor.is_floating_point()]


class _Overridden(nn.Module):
    """`inner` run with some of its tensors replaced (torch.func.functional_call), so nothing of it is modified."""

    def __init__(self, inner: nn.Module, overrides: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.inner = inner
        self.overrides = overrides

    def forward(self, *args: Any) -> Any:
        return torch.func.functional_call(self.inner, self.overrides, args, strict=False)


def rounding_sensitivity(model: nn.Module, inputs: Sequence[Any], folded: Sequence[tuple[str, str]],
                         consumers: set[str], outputs64: Any, stats_of: StatsOf, draws: int = DRAWS,
                         seed: int = 0,
                         run: Callable[[nn.Module, Sequence[Any]], Any] = float64_outputs) -> float | None:
    """max over `draws` of max|outputs - outputs64|, evaluated in float64, with the folded parameters of `folded`
    (layer, BatchNorm) moved one ulp each (see the module docstring); None when there is nothing to move or the
    model will not run that way. `run` evaluates in float64 (`seeded_outputs` will do for a float64 model)."""
    if outputs64 is None:
        return None
    generator = torch.Generator().manual_seed(seed)
    moved = 0.0
    for _ in range(draws):
        overrides = fold_rounding_overrides(model, folded, consumers, stats_of, generator)
        if not overrides:
            return None
        try:
            outputs = run(_Overridden(model, overrides), inputs)
        except Exception:  # noqa: BLE001 - a model that will not run with replaced tensors: no measure
            return None
        gap = output_gap(outputs64, outputs) if outputs is not None else None
        if gap is None:
            return None
        moved = max(moved, gap[0])
    return moved
