"""Folding into a Conv/Linear subclass with its own forward (bnstrip/fold/proof.py): timm's Conv2dSame pads then
convolves and folds; a weight-standardised conv does not; a BN before such a conv never folds into it."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnstrip.fold.model import fold_model
from bnstrip.refusals import refusal


class Conv2dSame(nn.Conv2d):
    """timm.layers.conv2d_same.Conv2dSame: TF 'SAME' padding computed from the input size, then F.conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        pad_h = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + (self.kernel_size[0] - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + (self.kernel_size[1] - 1) * self.dilation[1] + 1 - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class WeightStdConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Net(nn.Module):
    def __init__(self, conv: type[nn.Conv2d], shape_branch: bool = False) -> None:
        super().__init__()
        self.conv1 = conv(3, 4, 3, stride=2, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = conv(4, 4, 3)
        self.bn0 = nn.BatchNorm2d(4)
        self.shape_branch = shape_branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape_branch and x.shape[-1] > 1000:
            x = -x
        return self.conv2(self.bn0(torch.relu(self.bn1(self.conv1(x)))))


def _eval(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(4, generator=gen))
            m.running_var.copy_(torch.rand(4, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(4, generator=gen))
    return model.eval()


@pytest.mark.parametrize("shape_branch,tracer", [(False, "torch.fx"), (True, "torch.export")])
def test_conv2d_same_absorbs_the_batchnorm_after_it(shape_branch: bool, tracer: str) -> None:
    model = _eval(Net(Conv2dSame, shape_branch))
    x = torch.randn(2, 3, 9, 9)
    result = fold_model(model, x)
    assert result.tracer == tracer and result.folded == [("conv1", "bn1")]
    assert "conv1" in result.gained_bias
    reasons = dict(result.skipped)
    assert "bn0" in reasons  # never into such a conv as its consumer
    # fx sees Conv2dSame as one module (its own forward); torch.export sees the pad inside it (not a layer)
    assert ("NOT_A_LAYER" if shape_branch else "OWN_FORWARD") in refusal(reasons["bn0"]).causes
    with torch.no_grad():
        assert torch.allclose(model(x), result.model(x), rtol=1e-4, atol=1e-5)
        x2 = torch.randn(1, 3, 12, 12)
        assert torch.allclose(model(x2), result.model(x2), rtol=1e-4, atol=1e-5)


def test_weight_standardised_conv_is_refused_by_the_local_proof() -> None:
    model = _eval(Net(WeightStdConv))
    result = fold_model(model, torch.randn(2, 3, 9, 9))
    assert result.folded == []
    assert "does not scale its output" in dict(result.skipped)["bn1"]


def test_without_example_inputs_an_own_forward_conv_is_refused() -> None:
    result = fold_model(_eval(Net(Conv2dSame)))
    assert result.folded == [] and "example inputs" in dict(result.skipped)["bn1"]


class ClampedConv(nn.Conv2d):
    """A conv whose output is clamped to |y| <= 20: folding a BN after it is exact only while nothing is clamped."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).clamp(-20, 20)


def test_an_own_forward_that_changes_at_large_inputs_is_refused() -> None:
    """The example inputs never reach the clamp; the proof's inputs at magnitudes up to 1e4 do (issue 17 item 9)."""
    model = _eval(Net(ClampedConv))
    x = torch.randn(2, 3, 9, 9)
    result = fold_model(model, x)
    # bn1 would need conv1's clamped output scaled: refused. bn0 before conv2 is exact even so (conv2 clamps the
    # same pre-activation either way), and the consumer proof runs at every magnitude too.
    assert result.folded == [("conv2", "bn0")]
    assert "inputs of magnitude" in dict(result.skipped)["bn1"]
    with torch.no_grad():
        assert torch.allclose(model(x * 50), result.model(x * 50), rtol=1e-5, atol=1e-5)


class InputClampedConv(nn.Conv2d):
    """Clamps its input to |x| <= 20: a BatchNorm before it moves where the clamp bites, so it cannot absorb one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.clamp(-20, 20))


def test_an_own_forward_consumer_that_changes_at_large_inputs_is_refused() -> None:
    """The consumer-side proof (BatchNorm -> own-forward layer) also runs at magnitudes up to 1e4 (issue 17 item 9)."""
    model = _eval(Net(InputClampedConv))
    x = torch.randn(2, 3, 9, 9) * 0.1  # the example never reaches either clamp
    result = fold_model(model, x)
    assert ("conv2", "bn0") not in result.folded
    assert "inputs of magnitude" in dict(result.skipped)["bn0"]
    with torch.no_grad():
        assert torch.allclose(model(x * 500), result.model(x * 500), rtol=1e-5, atol=1e-5)
