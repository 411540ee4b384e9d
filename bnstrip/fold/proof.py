"""A local proof for layers with their own forward (timm's Conv2dSame): does scaling their output channels work?

Folding a BatchNorm into the layer before it rescales that layer's weight and bias per output
channel, which is exact only when the layer's output is W * x + b per channel. A Conv/Linear
subclass that overrides forward (pads first: fine; standardises its weight: not fine) is tested
here in float64 on seeded inputs at every scale of PROOF_SCALES (1e-4 to 1e4, both signs): the layer
with folded weights must give s * layer(x) + t at each.  One input at the example's scale is not
enough: a forward that clamps, or switches branch, for large inputs (|x| > 20) agrees there and
differs on real data.  fold_model's real-run check on the example inputs then proves the whole model.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence, cast

import torch
from torch import nn

from bnstrip._torch import ConvNd
from bnstrip.core.compare import seeded_inputs
from bnstrip.core.foldmath import BNStats, bn_scale_shift, fold_into_producer

PROOF_SCALES = (1e-4, 1e-2, 1.0, 1e2, 1e4)
"""Input magnitudes an own-forward layer is proven at: small and large, not just the example's."""
_RELATIVE = 1e-9
"""float64 agreement asked for, relative to the output scale (a wrong fold is off by the order of the outputs)."""


def own_forward_issue(layer: nn.Module, input_shape: Sequence[int] | None, stats: BNStats, name: str) -> str | None:
    """Why folding `stats` into `layer` (whose class overrides forward) is not exact, or None when it is on
    seeded float64 inputs of `input_shape` (the shape the layer got on the example inputs) at every PROOF_SCALES."""
    kind = type(layer).__name__
    if input_shape is None:
        return f"{kind} overrides forward and its input shape is unknown; pass example inputs (example_inputs)"
    scale, shift = bn_scale_shift(stats, name)
    try:
        original, folded = float64_pair(layer, lambda w, b: fold_into_producer(w, b, stats, out_axis=0, groups=1, name=name))
        unit = proof_inputs(input_shape)
        with torch.no_grad():
            pairs = [(original(unit * scale), folded(unit * scale)) for scale in PROOF_SCALES]
    except Exception as exc:  # noqa: BLE001 - user code in forward (dtype checks, ...)
        return f"{kind} overrides forward and cannot be run in float64 to prove the fold ({type(exc).__name__})"
    for magnitude, (expected, got) in zip(PROOF_SCALES, pairs, strict=True):
        problem = _scaled_gap(layer, expected, got, scale, shift)
        if problem is not None:
            return f"{kind} overrides forward, and {problem} (inputs of magnitude {magnitude:g}), so it cannot absorb it"
    return None


def proof_inputs(input_shape: Sequence[int]) -> torch.Tensor:
    """Seeded float64 inputs in [-1, 1) of the shape the layer got, scaled by each of PROOF_SCALES in turn."""
    return seeded_inputs(tuple(input_shape), seed=1, dtype=torch.float64) * 2 - 1


def float64_pair(layer: nn.Module, fold: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
                 ) -> tuple[nn.Module, nn.Module]:
    """The layer in float64, and a float64 copy whose weight and bias are `fold(weight, bias)`: the fold under proof
    (the layer is a conv or Linear subclass; a missing bias becomes a Parameter)."""
    original = cast("ConvNd | nn.Linear", copy.deepcopy(layer).to(torch.float64))
    folded = copy.deepcopy(original)
    with torch.no_grad():
        weight, new_bias = fold(folded.weight.detach(), None if folded.bias is None else folded.bias.detach())
        folded.weight.copy_(weight)
        if folded.bias is None:
            folded.bias = nn.Parameter(new_bias)
        else:
            folded.bias.copy_(new_bias)
    return original, folded


def _scaled_gap(layer: nn.Module, expected: object, got: object, scale: torch.Tensor, shift: torch.Tensor) -> str | None:
    """None when `got` (the folded layer's output) is scale * expected + shift per channel, else what differs."""
    if not isinstance(expected, torch.Tensor) or not isinstance(got, torch.Tensor) or expected.dim() < 2 \
            or got.shape != expected.shape:
        return "its output is not one tensor with channels"
    axis = 1 if not isinstance(layer, nn.Linear) else expected.dim() - 1
    view = [1] * expected.dim()
    view[axis] = -1
    want = expected * scale.reshape(view) + shift.reshape(view)
    gap = float((got - want).abs().max())
    if not gap <= _RELATIVE * max(float(want.abs().max()), 1.0):
        return (f"scaling its output channels through its weight and bias does not scale its output (off by {gap:.3g} "
                "in float64)")
    return None
