"""Issue 18 item 4: what a model's structure or caches do never escapes fold_model as a foreign exception."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnstrip.fold.model as fold_module
from bnstrip.fold.model import fold_model


def _anchors(h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return torch.stack((xs, ys)).flatten(1)


class AnchorCachingHead(nn.Module):
    """Like ultralytics' Detect: the anchors of an input size are made on the first run at that size and kept.

    The size test (`self.shape != shape or ...`) cannot be traced by torch.fx, so torch.export traces it,
    and its run under fake tensors would leave fake anchors behind in the module.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)
        self.shape: torch.Size | None = None
        self.anchors = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(torch.relu(self.bn(self.conv(x))))
        if self.shape != y.shape or self.anchors.numel() == 0:
            self.anchors = _anchors(*y.shape[-2:])
            self.shape = y.shape
        return y.flatten(2) + self.anchors


class FunctionalOnPlainTensors(nn.Module):
    """F.batch_norm on module attributes that are plain tensors, not buffers (PyTorch's inductor freezing tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        gen = torch.Generator().manual_seed(0)
        self.running_mean, self.running_var = torch.randn(4, generator=gen), torch.rand(4, generator=gen) + 0.5
        self.weight, self.bias = torch.rand(4, generator=gen) + 0.5, torch.randn(4, generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 1e-5)


class SharedFunctionalModule(nn.Module):
    """The module-sharing variant: one such module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.mix = FunctionalOnPlainTensors(), nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.mix(self.shared(x)))


def _inputs(size: int = 8) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_a_forward_that_caches_anchors_is_folded_and_keeps_real_anchors() -> None:
    model = AnchorCachingHead().eval()
    x = _inputs()
    result = fold_model(model, x)
    assert result.folded == [("conv", "bn")] and result.check is not None and result.check.passed
    assert model.shape is None  # the input model is untouched, its cache too
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), atol=1e-5)


@pytest.mark.torch_behaviour
def test_without_restoring_the_cache_the_tracer_would_leave_fake_anchors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The replica reproduces the ultralytics failure: with the cache left as the tracer made it, fold_model fails."""
    monkeypatch.setattr(fold_module, "_attributes_kept", lambda model: contextlib.nullcontext())
    try:
        result = fold_model(AnchorCachingHead().eval(), _inputs())
    except Exception as exc:  # noqa: BLE001 - the torch exception the fix is about
        assert "DataDependent" in type(exc).__name__ or "fake" in str(exc).lower()
        return
    if result.tracer != "torch.export":
        pytest.skip(f"torch traced the replica with {result.tracer}; the fake-cache path is not exercised")


def test_functional_batch_norm_on_plain_tensors_is_refused_with_a_reason() -> None:
    result = fold_model(FunctionalOnPlainTensors().eval(), _inputs())
    assert result.folded == []
    (name, reason), = result.skipped
    assert "running_mean" in name and "register_buffer" in reason
    assert any("none of its 1 BatchNorm" in w for w in result.warnings)


def test_a_shared_module_with_such_a_batch_norm_is_listed_once_with_a_reason() -> None:
    result = fold_model(SharedFunctionalModule().eval(), _inputs())
    assert result.folded == [] and len(result.skipped) == 1
    assert result.check is not None and result.check.passed
