"""Metadata reads and identity-in-eval ops in the op graph (bnstrip/trace/opgraph.py), through fold_model:
neither blocks a fold, in fx and in torch.export graphs; the model as given is the ground truth."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnstrip.fold.model import fold_model


def _stats(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
    return model.eval()


class MetadataNet(nn.Module):
    """Shape reads of the conv output (and of the BN output) before the BN / the next layer."""

    def __init__(self, shape_branch: bool = False) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Linear(4, 2)
        self.bn1d = nn.BatchNorm1d(4)
        self.shape_branch = shape_branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        torch._assert(y.ndim == 4, "expected 4D")
        n, c = y.size(0), y.shape[1]
        if self.shape_branch and x.shape[-1] > 1000:  # fx cannot trace this: torch.export
            y = -y
        z = self.bn(y).mean((2, 3)).reshape(n, c)
        torch._assert(z.dim() == 2, "2D")
        torch._assert(z.dtype == y.dtype, "dtype")
        return self.head(self.bn1d(z))


@pytest.mark.parametrize("shape_branch,tracer", [(False, "torch.fx"), (True, "torch.export")])
def test_metadata_reads_are_not_consumers(shape_branch: bool, tracer: str) -> None:
    model = _stats(MetadataNet(shape_branch))
    x = torch.randn(3, 3, 5, 5)
    result = fold_model(model, x)
    assert result.tracer == tracer
    assert ("conv", "bn") in result.folded and ("head", "bn1d") in result.folded, result.skipped
    with torch.no_grad():
        assert torch.allclose(model(x), result.model(x), rtol=1e-4, atol=1e-5)


class IdentityNet(nn.Module):
    """Identity, Dropout in eval and F.dropout(training=False) on both sides of BatchNorms."""

    def __init__(self, shape_branch: bool = False) -> None:
        super().__init__()
        self.conv, self.drop, self.bn = nn.Conv2d(3, 4, 1), nn.Dropout2d(0.3), nn.BatchNorm2d(4)
        self.ident, self.bn2, self.drop2, self.fc = nn.Identity(), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)
        self.shape_branch = shape_branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape_branch and x.shape[-1] > 1000:
            x = -x
        y = torch.relu(self.bn(F.dropout(self.ident(self.drop(self.conv(x))), 0.1, self.training)))
        return self.fc(self.drop2(self.ident(self.bn2(y.mean((2, 3))))))


@pytest.mark.parametrize("shape_branch,tracer", [(False, "torch.fx"), (True, "torch.export")])
def test_identity_in_eval_ops_are_transparent_and_stay(shape_branch: bool, tracer: str) -> None:
    model = _stats(IdentityNet(shape_branch))
    x = torch.randn(3, 3, 5, 5)
    result = fold_model(model, x)
    assert result.tracer == tracer
    assert sorted(result.folded) == [("conv", "bn"), ("fc", "bn2")], result.skipped
    assert isinstance(result.model.drop, nn.Dropout2d) and isinstance(result.model.ident, nn.Identity)
    with torch.no_grad():
        assert torch.allclose(model(x), result.model(x), rtol=1e-4, atol=1e-5)
