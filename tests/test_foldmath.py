"""Fold maths against PyTorch's own eval-mode conv/linear + BatchNorm (the ground truth)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bnstrip.errors import InputError
from bnstrip.core.foldmath import BNStats, bn_scale_shift, fold_into_consumer, fold_into_producer, fold_state_dict

from conftest import randomise_batchnorms


def stats_of(bn: nn.modules.batchnorm._BatchNorm) -> BNStats:
    return BNStats(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def folded_layer(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    weight, bias = fold_into_producer(layer.weight, layer.bias, stats_of(bn))
    out = type(layer)(*_ctor_args(layer)).to(layer.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        out.bias.copy_(bias)
    return out.eval()


def _ctor_args(layer: nn.Module) -> tuple:
    if isinstance(layer, nn.Linear):
        return (layer.in_features, layer.out_features)
    return (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_conv_bn_matches_sequential(dtype: torch.dtype, bias: bool, affine: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=bias)
    bn = nn.BatchNorm2d(8, affine=affine, eps=1e-3)
    reference = randomise_batchnorms(nn.Sequential(conv, bn)).to(dtype).eval()
    x = torch.randn(4, 3, 9, 9, dtype=dtype)
    got = folded_layer(conv, bn)(x)
    want = reference(x).detach()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_linear_bn_matches_sequential(dtype: torch.dtype, bias: bool, affine: bool) -> None:
    torch.manual_seed(1)
    linear = nn.Linear(20, 12, bias=bias)
    bn = nn.BatchNorm1d(12, affine=affine)
    reference = randomise_batchnorms(nn.Sequential(linear, bn), seed=3).to(dtype).eval()
    x = torch.randn(16, 20, dtype=dtype)
    got = folded_layer(linear, bn)(x)
    want = reference(x).detach()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max()))
    assert got.dtype == dtype


def test_bn_before_linear_folds_into_consumer() -> None:
    torch.manual_seed(2)
    bn, linear = nn.BatchNorm1d(10), nn.Linear(10, 4)
    reference = randomise_batchnorms(nn.Sequential(bn, linear), seed=4).double().eval()
    weight, bias = fold_into_consumer(linear.weight, linear.bias, stats_of(bn))
    x = torch.randn(8, 10, dtype=torch.float64)
    assert torch.allclose(x @ weight.T + bias, reference(x), rtol=1e-12, atol=1e-12)


def test_scale_shift_is_eval_batchnorm() -> None:
    bn = randomise_batchnorms(nn.BatchNorm1d(6), seed=5).double().eval()
    scale, shift = bn_scale_shift(stats_of(bn))
    x = torch.randn(5, 6, dtype=torch.float64)
    assert torch.allclose(x * scale + shift, bn(x), rtol=1e-13, atol=1e-13)


def test_half_precision_folds_in_float64_and_casts_once() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 4, 3).half()
    bn = randomise_batchnorms(nn.BatchNorm2d(4), seed=6).half()
    weight, bias = fold_into_producer(conv.weight, conv.bias, stats_of(bn))
    assert weight.dtype == torch.float16 and bias.dtype == torch.float16
    exact, _ = fold_into_producer(conv.weight.double(), conv.bias.double(), BNStats(
        bn.running_mean.double(), bn.running_var.double(), bn.weight.double(), bn.bias.double(), bn.eps))
    assert torch.equal(weight, exact.half())  # one rounding, from the float64 result


@pytest.mark.parametrize("field,value,message", [
    ("running_var", -1.0, "negative"),
    ("running_var", float("nan"), "NaN"),
    ("running_mean", float("inf"), "NaN/Inf"),
])
def test_bad_statistics_are_refused_with_layer_name(field: str, value: float, message: str) -> None:
    bn = nn.BatchNorm2d(4)
    getattr(bn, field)[1] = value
    with pytest.raises(InputError, match=message) as info:
        fold_into_producer(torch.ones(4, 2, 3, 3), None, stats_of(bn), name="conv7 + bn7")
    assert "conv7 + bn7" in str(info.value)


def test_channel_mismatch_is_refused() -> None:
    with pytest.raises(InputError, match="produces 5 channels but its BatchNorm has 4"):
        fold_into_producer(torch.ones(5, 2, 3, 3), None, stats_of(nn.BatchNorm2d(4)), name="conv")


def test_zero_variance_with_zero_eps_is_refused() -> None:
    bn = nn.BatchNorm1d(3, eps=0.0)
    bn.running_var.zero_()
    with pytest.raises(InputError, match="eps"):
        fold_into_producer(torch.ones(3, 3), None, stats_of(bn), name="fc")


def test_fold_state_dict_drops_bn_and_keeps_other_keys(random_smallnet_state) -> None:
    pairs = [("conv1.0", "conv1.1")]
    out = fold_state_dict(random_smallnet_state, pairs, eps=1e-5)
    assert not any(k.startswith("conv1.1.") for k in out)
    assert out["fc2.0.weight"] is random_smallnet_state["fc2.0.weight"]
    assert "conv1.0.bias" in out
