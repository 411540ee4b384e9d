"""A local proof for a layer with its own forward after a BatchNorm (timm's `Linear`, whose forward calls
F.linear itself): does it absorb the BatchNorm, x * s + t, through its weight and bias?

The consumer-side twin of bnstrip.fold.proof: on seeded float64 inputs of the shape the layer got, at
each of the proof's magnitudes (1e-4 .. 1e4, so a clamp or a branch on large inputs shows), the layer
with W diag(s) and b + W t must give what it gives on x * s + t. fold_model's real-run
check on the example inputs then proves the whole model as usual.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bnstrip.core.foldmath import BNStats, bn_scale_shift, fold_into_consumer
from bnstrip.fold.proof import _RELATIVE, PROOF_SCALES, float64_pair, proof_inputs  # the same proof, the consumer side


def own_forward_consumer_issue(layer: nn.Module, input_shape: Sequence[int] | None, axis: int, stats: BNStats,
                               name: str) -> str | None:
    """Why folding `stats` (on dim `axis` of the input) into `layer`, whose class overrides forward, is not exact,
    or None when it is on seeded float64 inputs of `input_shape` at every PROOF_SCALES."""
    kind = type(layer).__name__
    if input_shape is None:
        return f"{kind} overrides forward and its input shape is unknown; pass example inputs (example_inputs)"
    scale, shift = bn_scale_shift(stats, name)
    view = [1] * len(input_shape)
    view[axis] = -1
    scale, shift = scale.reshape(view), shift.reshape(view)
    try:
        original, folded = float64_pair(
            layer, lambda w, b: fold_into_consumer(w, b, stats, groups=getattr(layer, "groups", 1), name=name))
        unit = proof_inputs(input_shape)
        with torch.no_grad():
            # small and large inputs, not just the example's (a clamp or branch shows there)
            pairs = [(original(unit * m * scale + shift), folded(unit * m)) for m in PROOF_SCALES]
    except Exception as exc:  # noqa: BLE001 - user code in forward (dtype checks, ...)
        return f"{kind} overrides forward, and it cannot be run in float64 to prove the fold ({type(exc).__name__})"
    for magnitude, (want, got) in zip(PROOF_SCALES, pairs, strict=True):
        problem = _gap(want, got)
        if problem is not None:
            return f"{kind} overrides forward, and {problem} (inputs of magnitude {magnitude:g}), so it cannot absorb it"
    return None


def _gap(want: object, got: object) -> str | None:
    """None when the folded layer's output `got` is the layer's output on the normalised input, else what differs."""
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return "its output is not one tensor"
    gap = float((got - want).abs().max())
    if not gap <= _RELATIVE * max(float(want.abs().max()), 1.0):
        return (f"folding the BatchNorm into its weight and bias does not give its output on the normalised input "
                f"(off by {gap:.3g} in float64)")
    return None
