"""A local proof for layers with their own forward (timm's Conv2dSame): does scaling their output channels work?

Folding a BatchNorm into the layer before it rescales that layer's weight and bias per output
channel, which is exact only when the layer's output is W * x + b per channel. A Conv/Linear
subclass that overrides forward (pads first: fine; standardises its weight: not fine) is tested
here on one seeded input in float64: the layer with folded weights must give s * layer(x) + t.
fold_model's real-run check on the example inputs then proves the whole model as usual.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from bnstrip.core.compare import seeded_inputs
from bnstrip.core.foldmath import BNStats, bn_scale_shift, fold_into_producer

_RELATIVE = 1e-9
"""float64 agreement asked for, relative to the output scale (a wrong fold is off by the order of the outputs)."""


def own_forward_issue(layer: nn.Module, input_shape: Sequence[int] | None, stats: BNStats, name: str) -> str | None:
    """Why folding `stats` into `layer` (whose class overrides forward) is not exact, or None when it is on a
    seeded float64 input of `input_shape` (the shape the layer got on the example inputs)."""
    kind = type(layer).__name__
    if input_shape is None:
        return f"{kind} overrides forward and its input shape is unknown; pass example inputs (example_inputs)"
    scale, shift = bn_scale_shift(stats, name)
    try:
        wide = copy.deepcopy(layer).to(torch.float64)
        x = seeded_inputs(tuple(input_shape), seed=1, dtype=torch.float64) * 2 - 1
        with torch.no_grad():
            expected = wide(x)
            bias = None if wide.bias is None else wide.bias.detach()
            weight, new_bias = fold_into_producer(wide.weight.detach(), bias, stats, out_axis=0, groups=1, name=name)
            wide.weight.copy_(weight)
            if wide.bias is None:
                wide.bias = nn.Parameter(new_bias)
            else:
                wide.bias.copy_(new_bias)
            got = wide(x)
    except Exception as exc:  # noqa: BLE001 - user code in forward (dtype checks, ...)
        return f"{kind} overrides forward and cannot be run in float64 to prove the fold ({type(exc).__name__})"
    if not isinstance(expected, torch.Tensor) or not isinstance(got, torch.Tensor) or expected.dim() < 2 \
            or got.shape != expected.shape:
        return f"{kind} overrides forward and its output is not one tensor with channels"
    axis = 1 if not isinstance(layer, nn.Linear) else expected.dim() - 1
    view = [1] * expected.dim()
    view[axis] = -1
    want = expected * scale.reshape(view) + shift.reshape(view)
    gap = float((got - want).abs().max())
    if not gap <= _RELATIVE * max(float(want.abs().max()), 1.0):
        return (f"{kind} overrides forward, and scaling its output channels through its weight and bias does not "
                f"scale its output (off by {gap:.3g} in float64), so it cannot absorb it")
    return None
