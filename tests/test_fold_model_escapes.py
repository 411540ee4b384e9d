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


class BiasCacheInADict(nn.Module):
    """timm's EfficientViT-MSRA: an eval forward fills a dict it holds with a tensor it computed, in place, and reads it
    back on later calls; `len(x)` keeps torch.fx out, so torch.export traces it (with fake tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.biases = nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(2)))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = len(x)
        if "cpu" not in self.cache:
            self.cache["cpu"] = self.biases.view(1, -1, 1, 1) * 2
        return self.bn(self.conv(x)) + self.cache["cpu"] * rows


def test_a_dict_the_forward_fills_in_place_is_emptied_of_the_tracers_tensors() -> None:
    model = BiasCacheInADict().eval()
    x = _inputs()
    result = fold_model(model, x)
    assert result.folded == [("conv", "bn")] and result.check is not None and result.check.passed, result.skipped
    assert model.cache == {}  # the input model is untouched, its cache too
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), atol=1e-5)


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


def test_a_copy_that_shares_parameters_still_copies_buffers_and_attributes() -> None:
    from bnstrip.fold.check import copy_model

    model = AnchorCachingHead().eval()
    shared = copy_model(model, share_parameters=True)
    assert shared.conv.weight is not model.conv.weight and shared.conv.weight.data_ptr() == model.conv.weight.data_ptr()
    assert shared.bn.running_mean is not model.bn.running_mean and shared.anchors is not model.anchors
    with torch.no_grad():
        shared(_inputs())
    assert model.shape is None  # the forward's cache went into the copy


class WritesItsParameter(nn.Module):
    """A forward that counts its calls in a Parameter, in place: no run of bnstrip's may change the caller's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.calls = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.bn(self.conv(x)) * 0 + self.bn(self.conv(x)) + self.calls * 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_forward_that_writes_its_parameters_leaves_the_callers_untouched(dtype: torch.dtype) -> None:
    model = WritesItsParameter().eval().to(dtype)
    fold_model(model, _inputs().to(dtype))
    assert float(model.calls) == 0


class RenormalisingHead(nn.Conv2d):
    """A cosine-classifier head: each call rebinds its weight's `.data` (no in-place write count shows it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.data
        self.weight.data = F.normalize(w.flatten(1), dim=1).view_as(w)
        return self._conv_forward(x, self.weight, self.bias)


class FollowsItsInputsDtype(nn.Conv2d):
    """A layer that converts itself to its input's dtype: only the float64 evaluation ever takes that branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            self.to(x.dtype)
        return self._conv_forward(x, self.weight, self.bias)


@pytest.mark.parametrize("head", [RenormalisingHead, FollowsItsInputsDtype])
def test_the_float64_evaluation_never_reaches_the_callers_parameters(head: type) -> None:
    """A large bias cancelled by the running mean keeps the gap from deciding, so the float64 run happens."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), head(8, 4, 1)).eval()
    with torch.no_grad():
        model[0].bias.fill_(1000.0)
        model[1].running_mean.fill_(1000.0)
        model[1].running_var.uniform_(0.5, 2)
        model[3].weight.copy_(F.normalize(model[3].weight.flatten(1), dim=1).view_as(model[3].weight))
    weight = model[3].weight.detach().clone()
    result = fold_model(model, torch.rand(1, 3, 16, 16))
    assert result.folded == [("0", "1")] and result.check is not None and not result.check.implied
    assert model[3].weight.dtype == torch.float32 and torch.equal(model[3].weight, weight)
    with torch.no_grad():
        model(torch.rand(1, 3, 16, 16))  # still runs as a float32 model
