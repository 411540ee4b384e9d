"""The one comparator: exactness against a float64 evaluation of the original, relative to its own rounding."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnstrip.core.compare import (IMPLIED_FRACTION, ROUNDING_FACTOR, compare_models, compare_outputs, float64_outputs,
                                  implied_check, outputs_match, same_arguments, seeded_inputs, tolerance_for)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 600), nn.ReLU(), nn.Linear(600, 10)).eval()


def test_float64_evaluation_matches_a_float64_copy_without_copying_the_model() -> None:
    model = _net()
    x = seeded_inputs((4, 64), dtype=torch.float32)
    wide = copy.deepcopy(model).double()
    with torch.no_grad():
        expected = wide(x.double())
    got = float64_outputs(model, [x])
    assert got.dtype == torch.float64 and torch.allclose(got, expected, rtol=0, atol=1e-12)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model itself is untouched


def test_float64_evaluation_of_a_large_linear_goes_block_by_block_and_stays_exact() -> None:
    torch.manual_seed(1)
    model = nn.Linear(700, 800).eval()  # 560k weights: above the 2 MB block, so widened in column blocks
    x = seeded_inputs((3, 700), dtype=torch.float32)
    with torch.no_grad():
        expected = nn.functional.linear(x.double(), model.weight.double(), model.bias.double())
    assert torch.allclose(float64_outputs(model, [x]), expected, rtol=0, atol=1e-12)


def test_a_conv_head_on_a_1x1_input_runs_in_the_dispatch_mode_without_a_second_run(monkeypatch) -> None:
    """torch's conv2d checks operand dtypes before dispatch on a 1x1 input (timm's conv heads): the one
    _Float64Mode run must get through it, not fail at the last layer and run again a second way."""
    from bnstrip.core import compare

    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 5, 1)).eval()
    x = seeded_inputs((1, 3, 9, 9), dtype=torch.float32)

    def second_way(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fallback ran")

    monkeypatch.setattr(compare._Float64FunctionMode, "__torch_function__", second_way)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
    got = float64_outputs(model, [x])
    assert got is not None and torch.equal(got, expected)


def test_an_identical_model_passes_on_the_gap_alone_or_with_the_original_rounding() -> None:
    model = _net()
    x = [seeded_inputs((8, 64), dtype=torch.float32)]
    report = compare_models(model, copy.deepcopy(model), x, evaluate64=lambda: pytest.fail("the gap decides"))
    assert report is not None and report.passed and report.implied and report.max_abs_diff == 0
    report = compare_models(model, copy.deepcopy(model), x, original64=float64_outputs(model, x))
    assert report is not None and report.passed and report.rounding is not None and not report.implied
    assert report.tolerance >= ROUNDING_FACTOR * report.rounding


def test_a_wrong_fold_fails_and_the_message_gives_both_figures() -> None:
    model = _net()
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong[2].bias[0] += 1e-3
    report = compare_models(model, wrong, [seeded_inputs((8, 64), dtype=torch.float32)])
    assert report is not None and not report.passed
    text = report.describe()
    assert f"{report.max_abs_diff:.3g}" in text and f"{report.rounding:.3g}" in text


def test_the_tolerance_rule() -> None:
    eps = torch.finfo(torch.float32).eps
    assert tolerance_for(torch.float32, 10.0, 1e-3) == ROUNDING_FACTOR * 1e-3
    assert tolerance_for(torch.float32, 10.0, 0.0) > 0 and tolerance_for(torch.float32, 10.0, 0.0) < 1e3 * eps * 10
    assert tolerance_for(torch.float16, 1.0, None) == 2e-2  # no float64 evaluation: the dtype's own rule


def test_outputs_match_compares_structure_and_values() -> None:
    a = {"x": torch.ones(3), "n": 2}
    assert outputs_match(a, {"x": torch.ones(3), "n": 2})
    assert not outputs_match(a, {"x": torch.ones(3) * 1.01, "n": 2})
    assert not outputs_match(a, {"x": torch.ones(3), "n": 3})
    assert not outputs_match(a, [torch.ones(3), 2])


def test_seeded_inputs_refuse_a_huge_or_empty_shape_before_allocating() -> None:
    from bnstrip.core.compare import seeded_inputs
    from bnstrip.errors import InputError

    with pytest.raises(InputError, match="elements"):
        seeded_inputs([100000, 3, 1000, 1000])
    with pytest.raises(InputError, match="positive"):
        seeded_inputs([1, 0, 4])
    assert seeded_inputs([2, 3], seed=1).shape == (2, 3)


@pytest.mark.slow
def test_cli_names_the_flag_for_a_huge_input_shape(tmp_path) -> None:
    import subprocess
    import sys

    from bnstrip.testing.zoo import ResNet18Style

    checkpoint = tmp_path / "r18.pt"
    torch.save(ResNet18Style().state_dict(), checkpoint)
    proc = subprocess.run([sys.executable, "-m", "bnstrip", "fuse", "--arch", "bnstrip.testing.zoo:ResNet18Style",
                           str(checkpoint), str(tmp_path / "out.pt"), "--input-shape", "100000,3,1000,1000"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--input-shape" in lines[0] and "elements" in lines[0]
    assert not (tmp_path / "out.pt").exists()


def test_float64_evaluation_reaches_ops_that_check_dtypes_before_dispatch() -> None:
    # conv2d on a 1x1 input (a squeeze-excite block) checks input/weight/bias dtypes before any aten op
    # reaches a dispatch mode; the evaluation must still run in float64, not fall back to float32.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 4, 1), nn.Flatten()).eval()
    x = torch.randn(2, 3, 9, 9)
    got = float64_outputs(model, [x])
    assert got is not None and got.dtype == torch.float64
    expected = copy.deepcopy(model).double()(x.double())
    assert torch.allclose(got, expected, rtol=0, atol=1e-14)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_an_original_that_overflows_in_its_own_dtype_excuses_nothing() -> None:
    # The float32 original overflows where float64 does not: its own rounding is infinite, and that must
    # not make the tolerance infinite (a wrong fold would then pass).
    from bnstrip.core.compare import compare_outputs

    original64 = torch.tensor([1e39, 1.0], dtype=torch.float64)
    original = torch.tensor([float("inf"), 1.0])
    wrong = torch.tensor([float("inf"), 2.0])
    check = compare_outputs(original, wrong, original64, torch.float32)
    assert check is not None and not check.passed
    right = torch.tensor([float("inf"), 1.0])
    assert compare_outputs(original, right, original64, torch.float32).passed


def test_the_sensitivity_adds_to_the_own_rounding_and_the_floor_depends_on_the_dtype() -> None:
    from bnstrip.core.compare import FLOOR_ULPS, FLOOR_ULPS_HALF, PERTURBATION_FACTOR

    assert tolerance_for(torch.float32, 10.0, 1e-3, 1e-3) == ROUNDING_FACTOR * 1e-3 + PERTURBATION_FACTOR * 1e-3
    eps64 = torch.finfo(torch.float64).eps
    assert tolerance_for(torch.float64, 2.0, 0.0) == FLOOR_ULPS * eps64 * 2.0  # a float64 model: no own rounding
    assert tolerance_for(torch.float64, 2.0, 0.0, 1e-13) == PERTURBATION_FACTOR * 1e-13
    assert tolerance_for(torch.bfloat16, 2.0, 0.0) == FLOOR_ULPS_HALF * torch.finfo(torch.bfloat16).eps * 2.0


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float16, torch.bfloat16, torch.float32,
                                   torch.float64])
@pytest.mark.parametrize("scale", [0.03, 1.0, 7.5, 4e3])
def test_a_gap_the_implied_check_accepts_passes_the_float64_rule_whatever_the_own_rounding(dtype: torch.dtype,
                                                                                           scale: float) -> None:
    """The worst case for the shortcut: the fold's gap and the original's own error add up, and the original's own
    error also lowers the float64 scale the floor is taken at. For every own error, the full rule still passes."""
    eps = torch.finfo(dtype).eps
    original = torch.tensor([scale, -scale / 3, scale / 7], dtype=torch.float64)
    accepted = implied_check(original, original.clone(), dtype)
    assert accepted is not None and accepted.passed and accepted.implied and accepted.rounding is None
    bound = accepted.tolerance
    folded = original.clone()
    folded[0] += bound
    while implied_check(original, folded, dtype) is None:  # the largest gap the shortcut accepts, to the last ulp
        folded[0] = torch.nextafter(folded[0], original[0])
    assert float(folded[0] - original[0]) > 0.9 * bound
    for own_ulps in [0.0, 0.5, 1.0, 2.0, 3.0, 3.9, 4.0, 4.1, 6.0, 16.0, 100.0, 1e4]:
        own = own_ulps * eps * max(scale, 1.0)
        original64 = original.clone()
        original64[0] -= own  # away from the folded value, and a smaller output scale
        report = compare_outputs(original, folded, original64, dtype)
        assert report is not None and report.passed, (own_ulps, report)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_the_implied_check_leaves_a_larger_gap_to_the_float64_rule(dtype: torch.dtype) -> None:
    original = torch.tensor([2.0, -1.0], dtype=torch.float64)
    bound = implied_check(original, original, dtype).tolerance
    assert bound == pytest.approx(IMPLIED_FRACTION * (16 if dtype.itemsize >= 4 else 1) * torch.finfo(dtype).eps * 2.0)
    folded = original.clone()
    folded[1] += 1.01 * bound
    assert implied_check(original, folded, dtype) is None
    folded[1] = float("nan")
    assert implied_check(original, folded, dtype) is None
    assert implied_check(original, torch.zeros(3, dtype=torch.float64), dtype) is None  # another shape: the full rule


def test_same_arguments_compares_values_dtypes_and_structure() -> None:
    x = torch.arange(6.0).reshape(2, 3)
    assert same_arguments(((x,), {"k": 2}), ((x.clone(),), {"k": 2}))
    assert not same_arguments(((x,), {}), ((x + 1,), {}))
    assert not same_arguments(((x,), {}), ((x.double(),), {}))
    assert not same_arguments(((x,), {}), ((x, x), {}))
    assert not same_arguments(((x,), {"k": 2}), ((x,), {"k": 3}))
    assert not same_arguments(((torch.tensor([float("nan")]),), {}), ((torch.tensor([float("nan")]),), {}))
