"""Exported programs (bnstrip/trace/modularize*.py, trace/export_tracer.py): BatchNorms written as arithmetic
(FrozenBatchNorm2d exports as mul/add/rsqrt), module names with call-like segments, and every
BatchNorm-like op listed exactly once. Ground truth: the unfolded model in float64."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bnstrip import fold_model
from bnstrip.fold.program import fold_program
from bnstrip.trace.export_tracer import real_module_path
from bnstrip.testing.zoo_patterns import FrozenBatchNorm2d, FrozenFPN, SlicedBackbone
from conftest import ExportOnly

EXACT = 1e-12


def _frozen_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            n = module.running_var.numel()
            module.running_var.copy_(10 ** (torch.rand(n, generator=gen) * 4 - 2))
            module.running_mean.copy_(torch.randn(n, generator=gen) * 2)
            module.weight.data.copy_(torch.randn(n, generator=gen))
            module.bias.data.copy_(torch.randn(n, generator=gen))
    return model.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(a.abs().max()), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frozen_batchnorm_in_a_program_folds(dtype: torch.dtype) -> None:
    model = _frozen_stats(FrozenFPN()).to(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    result = fold_program(torch.export.export(model, (x,), strict=False))
    assert result.folded == [("conv1", "bn1"), ("conv2", "bn2")] and result.skipped == []
    assert result.self_check.passed
    text = str(result.program.graph)
    assert "rsqrt" not in text and "batch_norm" not in text
    if dtype == torch.float64:
        fresh = torch.rand(2, 3, 8, 8, dtype=dtype) * 4 - 2
        with torch.no_grad():
            assert _rel(model(fresh), result.program.module()(fresh)) <= EXACT


class _FrozenNearMisses(nn.Module):
    """A FrozenBatchNorm2d whose scale is also read elsewhere, one after a ReLU with no layer, one that folds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn_shared = FrozenBatchNorm2d(4)
        self.bn_alone = FrozenBatchNorm2d(4)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.bn_ok = FrozenBatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.bn_shared(self.conv(x))
        leak = self.bn_shared.weight * 2
        z = self.bn_alone(torch.relu(y))
        return y, leak, z, self.bn_ok(self.conv2(x))


def test_every_frozen_batchnorm_is_listed_once_with_a_reason() -> None:
    model = _frozen_stats(_FrozenNearMisses()).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    result = fold_program(torch.export.export(model, (x,), strict=False))
    names = [bn for _, bn in result.folded] + [bn for bn, _ in result.skipped]
    assert sorted(names) == ["bn_alone", "bn_ok", "bn_shared"]
    assert [bn for _, bn in result.folded] == ["bn_ok"]
    reasons = dict(result.skipped)
    assert "also used elsewhere" in reasons["bn_shared"]
    assert "not directly" in reasons["bn_alone"]
    with torch.no_grad():
        for want, got in zip(model(x), result.program.module()(x), strict=True):
            assert _rel(want, got) <= EXACT


def test_call_like_path_segments_map_to_the_real_module() -> None:
    model = SlicedBackbone()
    assert real_module_path("model.slice(None, -1, None).0.stem1.bn", model) == "model.0.stem1.bn"
    assert real_module_path("model.slice(1, None, None).0.1", model) == "model.1.1"
    assert real_module_path("model.slice(None, -1, None).7.bn", model) == "model.slice(None, -1, None).7.bn"




def test_a_sequential_slice_called_in_forward_folds_on_every_path() -> None:
    model = _frozen_stats(SlicedBackbone()).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    expected = [("model.0.stem1.conv", "model.0.stem1.bn"), ("model.1.0", "model.1.1")]
    exported = fold_model(ExportOnly(model).eval(), x)
    assert exported.tracer == "torch.export"
    assert exported.folded == [(f"inner.{a}", f"inner.{b}") for a, b in expected] and exported.skipped == []
    program = fold_program(torch.export.export(model, (x,), strict=False))
    assert program.folded == expected and program.skipped == []
    with torch.no_grad():
        assert _rel(model(x), exported.model(x)) <= EXACT
        assert _rel(model(x), program.program.module()(x)) <= EXACT
