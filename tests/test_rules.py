"""The structural fold patterns of bnstrip.fold.rules: through reshapes, concatenations, global averages, shared pairs.

Each pattern has a small replica of the real model that needs it (no timm). Ground truth is the
original model run in eval mode; the BatchNorms PyTorch still executes are counted by its own
dispatcher. Every replica is folded through torch.fx and through torch.export (forced by a loop
over a shape that fx cannot trace), with and without keep_structure.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bnstrip import fold_model
from bnstrip.testing.zoo import randomize_bn
from bnstrip.refusals import refusal_code
from conftest import ExportOnly

REL_TOL = 1e-5


class _CountBatchNorms(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += "batch_norm" in func.name()
        return func(*args, **(kwargs or {}))


def _bn_calls(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    with torch.no_grad(), _CountBatchNorms() as counter:
        model(*inputs)
    return counter.count


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(a.abs().max()), 1.0)


class LinearNorm(nn.Module):
    """LeViT's LinearNorm: a Linear on (B, N, C), BatchNorm1d over (B*N, C), reshaped back."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTLike(nn.Module):
    """LinearNorm twice, a conv seen as (B, C, H*W) by a BatchNorm1d, a Linear transposed into a BatchNorm1d,
    and LeViT's head: mean over tokens -> BatchNorm1d -> Dropout -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = LinearNorm(8, 12)
        self.proj = LinearNorm(12, 8)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_seq = nn.BatchNorm1d(6)
        self.tok = nn.Linear(8, 5)
        self.bn_tok = nn.BatchNorm1d(5)
        self.head_bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.proj(torch.relu(self.qkv(x)))
        seq = self.bn_seq(self.conv(img).flatten(2))
        tok = self.bn_tok(self.tok(x).transpose(1, 2))
        return self.head(self.drop(self.head_bn(x.mean(1)))), seq, tok


class MixedConv(nn.Module):
    """MixNet's mixed depthwise conv and NASNet's factorised reduction: cat of convs -> one BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.k3 = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.k5 = nn.Conv2d(4, 4, 5, padding=2, groups=4, bias=False)
        self.k7 = nn.Conv2d(4, 2, 7, padding=3, bias=True)
        self.bn = nn.BatchNorm2d(10)
        self.path_1 = nn.Conv2d(10, 3, 1, bias=False)
        self.path_2 = nn.Conv2d(10, 5, 1, bias=False)
        self.final_bn = nn.BatchNorm2d(8, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.split(4, dim=1)
        x = torch.relu(self.bn(torch.cat([self.k3(a), self.k5(b), self.k7(a)], dim=1)))
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.final_bn(torch.cat([self.path_1(x[:, :, ::2, ::2]), self.path_2(shifted[:, :, ::2, ::2])], 1))


class ConvMixerHead(nn.Module):
    """ConvMixer / StarNet / EfficientFormerV2 heads: BN -> global average (module, function, mean) -> Linear/1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc_a = nn.Linear(6, 3)
        self.bn_b = nn.BatchNorm2d(6)
        self.fc_b = nn.Linear(6, 3, bias=False)
        self.bn_c = nn.BatchNorm2d(6)
        self.head_conv = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = F.gelu(self.stem(x))
        a = self.fc_a(nn.functional.dropout(torch.flatten(self.pool(self.bn_a(x)), 1), 0.5, training=False))
        b = self.fc_b(self.bn_b(x).mean((-2, -1)))
        c = self.head_conv(F.adaptive_avg_pool2d(self.bn_c(x), 1)).flatten(1)
        return a, b, c


class SharedPair(nn.Module):
    """A (conv, BN) pair applied twice with the same weights (a recurrent or weight-shared cell)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            x = torch.relu(self.bn(self.conv(x)))
        return x




CASES = {
    "LeViTLike": (LeViTLike, ((2, 4, 8), (2, 3, 4, 4)),
                  {"qkv.bn": "qkv.linear", "proj.bn": "proj.linear", "bn_seq": "conv", "bn_tok": "tok",
                   "head_bn": "head"}),
    "MixedConv": (MixedConv, ((2, 8, 6, 6),), {"bn": "k3 + k5 + k7", "final_bn": "path_1 + path_2"}),
    "ConvMixerHead": (ConvMixerHead, ((2, 3, 5, 5),), {"bn_a": "fc_a", "bn_b": "fc_b", "bn_c": "head_conv"}),
    "SharedPair": (SharedPair, ((2, 4, 5, 5),), {"bn": "conv"}),
}


def _build(name: str, export_only: bool) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, str]]:
    cls, shapes, expected = CASES[name]
    torch.manual_seed(0)
    model = randomize_bn(cls()).eval()
    if export_only:
        model = ExportOnly(model).eval()
        expected = {f"inner.{bn}": " + ".join(f"inner.{layer}" for layer in layers.split(" + "))
                    for bn, layers in expected.items()}
    gen = torch.Generator().manual_seed(1)
    return model, tuple(torch.randn(*s, generator=gen) for s in shapes), expected


@pytest.mark.parametrize("keep_structure", [False, True])
@pytest.mark.parametrize("export_only", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_structural_patterns_fold_exactly(name: str, export_only: bool, keep_structure: bool) -> None:
    model, inputs, expected = _build(name, export_only)
    result = fold_model(model, inputs, keep_structure=keep_structure)
    assert result.tracer == ("torch.export" if export_only else "torch.fx")
    if keep_structure and name == "ConvMixerHead":  # fc_b has no bias slot for the shift
        bn_b = next(bn for bn in expected if bn.endswith("bn_b"))
        expected = {bn: layer for bn, layer in expected.items() if bn != bn_b}
        assert [bn for bn, _ in result.skipped] == [bn_b] and "no bias" in result.skipped[0][1]
    else:
        assert result.skipped == []
    assert {bn: layer for layer, bn in result.folded} == expected
    with torch.no_grad():
        want, got = model(*inputs), result.model(*inputs)
    for a, b in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,), strict=True):
        assert _rel(a, b) <= REL_TOL
    if not keep_structure:
        assert _bn_calls(result.model, inputs) == len(result.skipped) < _bn_calls(model, inputs)


def test_folds_hold_on_inputs_the_check_never_saw() -> None:
    """The patterns are exact, not fitted to the example inputs: other shapes and values agree too."""
    for name, other in (("LeViTLike", ((3, 7, 8), (1, 3, 6, 2))), ("ConvMixerHead", ((1, 3, 9, 4),))):
        model, inputs, _ = _build(name, False)
        folded = fold_model(model, inputs).model
        fresh = tuple(torch.rand(*s) * 10 - 5 for s in other)
        with torch.no_grad():
            for a, b in zip(model(*fresh), folded(*fresh), strict=True):
                assert _rel(a, b) <= REL_TOL


class _Refused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.bn_used = nn.BatchNorm2d(8)      # cat piece a also feeds the output
        self.bn_relu = nn.BatchNorm2d(8)      # cat of a conv and a relu
        self.c = nn.Conv2d(3, 4, 1)
        self.bn_mix = nn.BatchNorm2d(4)       # BN -> flatten(1) -> Linear mixes channels with pixels
        self.fc_mix = nn.Linear(4 * 9, 2)
        self.bn_row = nn.BatchNorm2d(4)       # BN -> mean over H only -> Linear over W
        self.fc_row = nn.Linear(3, 2)
        self.lin = nn.Linear(5, 6)
        self.bn_tok = nn.BatchNorm1d(4)       # Linear (B, 4, 6) -> BN1d normalises the 4 tokens, not features
        self.shared = nn.Conv2d(4, 4, 1)
        self.bn_x, self.bn_y = nn.BatchNorm2d(4), nn.BatchNorm2d(4)  # one conv, two BatchNorms

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.a(x)
        u = self.bn_used(torch.cat([a, self.b(x)], 1))
        v = self.bn_relu(torch.cat([torch.relu(x[:, :1].expand(-1, 4, -1, -1)), self.b(x) * 0 + 1], 1))
        c = torch.relu(self.c(x))
        m = self.fc_mix(self.bn_mix(c).flatten(1))
        r = self.fc_row(self.bn_row(c).mean(2))
        tok = self.bn_tok(self.lin(t))
        s = self.bn_y(self.shared(self.bn_x(self.shared(c))))
        return a, u, v, m, r, tok, s


def test_what_would_not_be_exact_stays_refused_with_the_reason() -> None:
    torch.manual_seed(0)
    model = randomize_bn(_Refused()).eval()
    inputs = (torch.randn(2, 3, 3, 3), torch.randn(2, 4, 5))
    result = fold_model(model, inputs)
    skipped = dict(result.skipped)
    assert "also feeds" in skipped["bn_used"] and "a also feeds" in skipped["bn_used"]
    assert "cannot absorb its channels" in skipped["bn_relu"]
    assert "mixes its channel dim" in skipped["bn_mix"]
    assert "mixes the last dim" in skipped["bn_row"]
    assert "bn_tok" in skipped
    assert skipped["bn_x"].startswith("it is called") is False and "shared is called 2 times" in skipped["bn_x"]
    assert "shared is called 2 times" in skipped["bn_y"]
    with torch.no_grad():
        for want, got in zip(model(*inputs), result.model(*inputs), strict=True):
            assert _rel(want, got) <= REL_TOL


def test_a_pair_called_together_but_also_alone_stays_refused() -> None:
    class PairPlusOne(SharedPair):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + self.conv(x)  # a third conv call without the BatchNorm

    torch.manual_seed(0)
    model = randomize_bn(PairPlusOne()).eval()
    x = torch.randn(2, 4, 5, 5)
    result = fold_model(model, x)
    assert result.folded == []
    assert refusal_code(dict(result.skipped)["bn"]) == "CALL_COUNT"
