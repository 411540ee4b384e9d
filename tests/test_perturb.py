"""bnstrip.core.perturb: one ulp of the folded parameters, and how far it moves a model's float64 outputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bnstrip.core.compare import float64_outputs
from bnstrip.core.perturb import one_ulp_moved, rounding_sensitivity
from bnstrip.trace.bn_registry import module_stats


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_each_nonzero_element_moves_exactly_one_ulp_of_its_dtype(dtype: torch.dtype) -> None:
    values = torch.tensor([1.0, -3.0, 0.0, 1e-3, 250.0, -0.7], dtype=dtype)
    moved = one_ulp_moved(values, torch.Generator().manual_seed(0))
    assert moved.dtype == torch.float64 and moved[2] == 0
    for original, new in zip(values.tolist(), moved.tolist(), strict=True):
        if original == 0:
            continue
        magnitude = torch.tensor(abs(original), dtype=dtype)
        ulp = float(torch.nextafter(magnitude, torch.tensor(float("inf"), dtype=dtype))) - abs(original)
        assert abs(new - original) == ulp  # the ulp of the value's binade, up or down


def _conv_bn(dtype: torch.dtype, var: float) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[1].running_var.fill_(var)
        model[1].running_mean.normal_()
    return model.to(dtype), torch.rand(2, 3, 5, 5, dtype=dtype)


def test_the_sensitivity_grows_with_the_dtype_and_the_conditioning() -> None:
    figures = {}
    for dtype in (torch.float32, torch.float64):
        for var in (1.0, 1e-6):
            model, x = _conv_bn(dtype, var)
            outputs64 = float64_outputs(model, [x])
            figures[dtype, var] = rounding_sensitivity(model, [x], [("0", "1")], set(), outputs64, module_stats)
    assert all(value is not None and value > 0 for value in figures.values())
    assert figures[torch.float32, 1.0] > 1e6 * figures[torch.float64, 1.0]  # eps32 / eps64 is 5e8
    assert figures[torch.float32, 1e-6] > 10 * figures[torch.float32, 1.0]  # s = 1/sqrt(1e-6 + 1e-5) ~ 300


def test_nothing_to_move_is_no_measure() -> None:
    model, x = _conv_bn(torch.float32, 1.0)
    assert rounding_sensitivity(model, [x], [("missing", "1")], set(), float64_outputs(model, [x]), module_stats) is None
    assert rounding_sensitivity(model, [x], [("0", "1")], set(), None, module_stats) is None
