"""The later fold patterns (issue 18), each on a small replica of the real layer (bnstrip/testing/zoo_patterns.py).

Ground truth is the unfolded replica itself in float64: a correct fold agrees with it to float64
rounding (~1e-15 relative), a wrong one by the order of the outputs. Every replica is folded through
torch.fx and through torch.export (a loop over a size that fx cannot trace); refusals keep their reason.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnstrip import fold_model
from bnstrip.trace.bn_registry import (
    children_after,
    register_batchnorm,
    unregister_batchnorm,
)
from bnstrip.testing.zoo import randomize_bn
from bnstrip.testing.zoo_patterns import PATTERN_ZOO, BatchNormAct2d, TimmLinear, build
from conftest import ExportOnly

SLOW = {"RepViTLike"}
"""Merging then folding again runs several float64 depthwise convs and proofs: seconds, so CI's slow job."""
NAMES = [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in sorted(PATTERN_ZOO)]

EXACT = 1e-12
"""Relative agreement of a float64 fold with the float64 original (float64 rounding is ~1e-16)."""

EXPECTED = {
    "LambdaQKV": {"norm_q": "qkv", "norm_v": "qkv"},
    "SlicedHeads": {"bn_a": "conv", "bn_c": "conv", "bn_tail": "lin"},
    "MixedSame": {"bn": "k3 + k5"},
    "SharedNorm": {"norm": "k + v", "bn2d": "key + value"},
    "NormActHead": {"norm": "proj"},
    "StarHead": {"norm": "head"},
    "RepViTLike": {"mixer.conv.1": "mixer.conv.0", "mixer2.conv.1": "mixer2.conv.0", "mixer.bn": "mixer.conv.0",
                   "mixer2.bn": "mixer2.conv.0"},
    "ConvMulAddBN": {"bn": "conv"},
}


@pytest.fixture(autouse=True)
def _registered_norm_act():
    register_batchnorm(BatchNormAct2d, post=children_after("drop", "act"))
    yield
    unregister_batchnorm(BatchNormAct2d)




def _outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(*inputs)
    return out if isinstance(out, tuple) else (out,)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(a.abs().max()), 1.0)


@pytest.mark.parametrize("export_only", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_each_pattern_folds_exactly_in_float64(name: str, export_only: bool) -> None:
    model, inputs = build(name)
    expected = EXPECTED[name]
    if export_only:
        if name == "RepViTLike":
            pytest.skip("merging on the export path: test_reparam_export.py")
        model = ExportOnly(model).eval()
        expected = {f"inner.{bn}": " + ".join(f"inner.{p}" for p in layer.split(" + ")) for bn, layer in expected.items()}
    result = fold_model(model, inputs, reparameterize=name == "RepViTLike")
    assert result.tracer == ("torch.export" if export_only else "torch.fx")
    assert result.skipped == []
    assert {bn: layer for layer, bn in result.folded} == expected
    fresh = tuple(torch.rand_like(t) * 6 - 3 for t in inputs)  # exact, not fitted to the example inputs
    for sample in (inputs, fresh):
        for want, got in zip(_outputs(model, sample), _outputs(result.model, sample), strict=True):
            assert _rel(want, got) <= EXACT


@pytest.mark.parametrize("name", NAMES)
def test_float32_folds_as_many_as_float64(name: str) -> None:
    counts = []
    for dtype in (torch.float32, torch.float64):
        model, inputs = build(name, dtype=dtype)
        counts.append(len(fold_model(model, inputs, reparameterize=name == "RepViTLike").folded))
    assert counts[0] == counts[1] == len(EXPECTED[name])


class _NotExact(nn.Module):
    """Near misses of each pattern, each of which must stay refused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn_overlap = nn.BatchNorm2d(4)             # its slice is also read raw, x[:, 2:6]
        self.norm_relu = BatchNormAct2d(8, nn.ReLU())   # applies a ReLU after normalising
        self.after_relu = nn.Conv2d(8, 4, 1)
        self.bn_two = nn.BatchNorm2d(8)                 # feeds a 1x1 conv and a zero-padded 3x3 conv
        self.one, self.padded = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 3, padding=1)
        self.conv_zero = nn.Conv2d(3, 2, 1)
        self.bn_zero = nn.BatchNorm2d(2)                # after x * 0: nothing to scale back
        self.bn_head = nn.BatchNorm1d(8)
        self.head = _DoublingLinear(8, 3)               # its forward is not F.linear of its input

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.conv(x)
        a = self.bn_overlap(y[:, :4])
        raw = y[:, 2:6]
        r = self.after_relu(self.norm_relu(y))
        two = self.bn_two(y * 1.0 + 0.0)
        z = self.bn_zero(self.conv_zero(x) * 0.0)
        h = self.head(self.bn_head(y.mean((2, 3))))
        return a, raw, r, self.one(two), self.padded(two), z, h


class _DoublingLinear(TimmLinear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input * 2, self.weight, self.bias)


def test_near_misses_stay_refused_with_the_reason() -> None:
    torch.manual_seed(0)
    model = randomize_bn(_NotExact()).eval().double()
    inputs = (torch.randn(2, 3, 5, 5, dtype=torch.float64),)
    result = fold_model(model, inputs)
    reasons = dict(result.skipped)
    assert "also reads channels" in reasons["bn_overlap"]
    assert "applies more after normalising" in reasons["norm_relu"]
    assert "zero-pads" in reasons["bn_two"]
    assert "multiplies some channel by 0" in reasons["bn_zero"]
    assert "does not give its output" in reasons["bn_head"]
    for want, got in zip(_outputs(model, inputs), _outputs(result.model, inputs), strict=True):
        assert _rel(want, got) <= EXACT


def test_a_slice_fold_keeps_the_other_rows_and_their_bias() -> None:
    model, inputs = build("SlicedHeads")
    folded = fold_model(model, inputs).model
    assert torch.equal(folded.conv.weight[4:8], model.conv.weight[4:8])  # the raw piece b
    assert torch.equal(folded.conv.bias[4:8], model.conv.bias[4:8])
    assert not torch.equal(folded.conv.weight[:4], model.conv.weight[:4])


def test_keep_structure_refuses_what_it_cannot_hold() -> None:
    for name, bn in (("LambdaQKV", "norm_q"), ("ConvMulAddBN", "bn")):
        model, inputs = build(name)
        result = fold_model(model, inputs, keep_structure=True)
        assert "keep_structure=True" in dict(result.skipped)[bn]
        for want, got in zip(_outputs(model, inputs), _outputs(result.model, inputs), strict=True):
            assert _rel(want, got) <= EXACT


class _TiedConsumers(nn.Module):
    """Two Linear layers sharing one weight after a BatchNorm: folding into both would fold it twice."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.k, self.v = nn.Linear(4, 3), nn.Linear(4, 3)
        self.v.weight = self.k.weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.bn(x)
        return self.k(y), self.v(y)


def test_consumers_sharing_a_weight_are_never_folded_twice() -> None:
    torch.manual_seed(0)
    model = randomize_bn(_TiedConsumers()).eval().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    result = fold_model(model, x)
    assert result.folded == [] and "shares memory" in dict(result.skipped)["bn"]
