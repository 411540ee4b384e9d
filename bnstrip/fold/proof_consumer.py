"""A local proof for a layer with its own forward after a BatchNorm (timm's `Linear`, whose forward calls
F.linear itself): does it absorb the BatchNorm, x * s + t, through its weight and bias?

The consumer-side twin of bnstrip.fold.proof: on seeded float64 inputs of the shape the layer got, at
each of the proof's magnitudes (1e-4 .. 1e4, so a clamp or a branch on large inputs shows), the layer
with W diag(s) and b + W t must give what it gives on x * s + t. fold_model's real-run
check on the example inputs then proves the whole model as usual.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from bnstrip._torch import ConvNd
from bnstrip.core.compare import seeded_inputs
from bnstrip.core.foldmath import BNStats, bn_scale_shift, fold_into_consumer
from bnstrip.fold.proof import PROOF_SCALES

_RELATIVE = 1e-9
"""float64 agreement asked for, relative to the output scale (a wrong fold is off by the order of the outputs)."""


def own_forward_consumer_issue(layer: nn.Module, input_shape: Sequence[int] | None, axis: int, stats: BNStats,
                               name: str) -> str | None:
    """Why folding `stats` (on dim `axis` of the input) into `layer`, whose class overrides forward, is not exact,
    or None when it is on a seeded float64 input of `input_shape`."""
    kind = type(layer).__name__
    if input_shape is None:
        return f"{kind} overrides forward and its input shape is unknown; pass example inputs (example_inputs)"
    scale, shift = bn_scale_shift(stats, name)
    view = [1] * len(input_shape)
    view[axis] = -1
    for magnitude in PROOF_SCALES:  # small and large inputs, not just the example's (a clamp or branch shows there)
        problem = _absorbs_at(layer, input_shape, axis, stats, name, scale.reshape(view), shift.reshape(view), magnitude)
        if problem is not None:
            return f"{kind} overrides forward, and {problem} (inputs of magnitude {magnitude:g}), so it cannot absorb it"
    return None


def _absorbs_at(layer: nn.Module, input_shape: Sequence[int], axis: int, stats: BNStats, name: str,
                scale: torch.Tensor, shift: torch.Tensor, magnitude: float) -> str | None:
    """Why the folded layer's float64 output differs from the layer on the normalised input at this magnitude."""
    try:
        wide = cast("ConvNd | nn.Linear", copy.deepcopy(layer).to(torch.float64))  # a 'layer' op: a conv or Linear subclass
        x = (seeded_inputs(tuple(input_shape), seed=1, dtype=torch.float64) * 2 - 1) * magnitude
        with torch.no_grad():
            want = wide(x * scale + shift)
            bias = None if wide.bias is None else wide.bias.detach()
            weight, new_bias = fold_into_consumer(wide.weight.detach(), bias, stats,
                                                  groups=getattr(wide, "groups", 1), name=name)
            wide.weight.copy_(weight)
            if wide.bias is None:
                wide.bias = nn.Parameter(new_bias)
            else:
                wide.bias.copy_(new_bias)
            got = wide(x)
    except Exception as exc:  # noqa: BLE001 - user code in forward (dtype checks, ...)
        return f"it cannot be run in float64 to prove the fold ({type(exc).__name__})"
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return "its output is not one tensor"
    gap = float((got - want).abs().max())
    if not gap <= _RELATIVE * max(float(want.abs().max()), 1.0):
        return (f"folding the BatchNorm into its weight and bias does not give its output on the normalised input "
                f"(off by {gap:.3g} in float64)")
    return None
