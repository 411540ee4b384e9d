"""Problem 4: log-density of X = AY + b by change of variables and in closed form, against torch.distributions."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from bnstrip.cli import main
from bnstrip.homework.derivations import density as density_module
from bnstrip.homework.derivations.density import (
    check_density,
    log_density_change_of_variables,
    log_density_closed_form,
    random_affine,
)
from bnstrip.errors import InputError


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_one_dimensional_value_by_hand() -> None:
    """X = 2Y + 1: p_X(x) = exp(-(x-1)^2/8) / (2 sqrt(2 pi)); at x = 3 that is exp(-1/2) / (2 sqrt(2 pi))."""
    a = torch.tensor([[2.0]], dtype=torch.float64)
    b = torch.tensor([1.0], dtype=torch.float64)
    x = torch.tensor([[3.0]], dtype=torch.float64)
    expected = -0.5 - math.log(2) - 0.5 * math.log(2 * math.pi)
    assert float(log_density_change_of_variables(x, a, b)[0]) == pytest.approx(expected, abs=1e-15)
    assert float(log_density_closed_form(x, b, a @ a.T)[0]) == pytest.approx(expected, abs=1e-15)


def test_identity_map_is_the_standard_normal() -> None:
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eye, zero = torch.eye(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    truth = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(dim=1)
    torch.testing.assert_close(log_density_change_of_variables(x, eye, zero), truth)
    torch.testing.assert_close(log_density_closed_form(x, zero, eye), truth)


@pytest.mark.parametrize("dim", [1, 2, 5, 17, 60])
def test_both_routes_match_torch_on_random_affine_maps(dim: int) -> None:
    a, b = random_affine(dim, seed=dim)
    gen = torch.Generator().manual_seed(100 + dim)
    x = torch.randn(200, dim, generator=gen, dtype=torch.float64) * 2
    truth = torch.distributions.MultivariateNormal(b, scale_tril=torch.linalg.cholesky(a @ a.T)).log_prob(x)
    torch.testing.assert_close(log_density_change_of_variables(x, a, b), truth, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(log_density_closed_form(x, b, a @ a.T), truth, rtol=1e-11, atol=1e-11)
    result = check_density(a, b, 300, seed=dim)
    assert result.passed and result.dim == dim and result.points == 300
    assert result.max_abs_diff_formula_vs_closed_form < 1e-10 and result.max_abs_diff_vs_torch < 1e-10


def test_density_integrates_to_one_in_two_dimensions() -> None:
    """Riemann sum of exp(log p_X) over a wide grid: the formula is a density, not just a match with torch."""
    a = torch.tensor([[1.0, 0.5], [-0.3, 0.8]], dtype=torch.float64)
    b = torch.tensor([0.5, -1.0], dtype=torch.float64)
    grid = torch.linspace(-8, 8, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    step = float(grid[1] - grid[0])
    total = float(log_density_change_of_variables(points, a, b).exp().sum()) * step**2
    assert total == pytest.approx(1.0, abs=1e-6)


def test_random_affine_is_invertible_and_reproducible() -> None:
    a, b = random_affine(6, seed=3)
    a2, b2 = random_affine(6, seed=3)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    singular_values = torch.linalg.svdvals(a)
    assert float(singular_values.min()) >= 0.5 - 1e-12 and float(singular_values.max()) <= 2 + 1e-12


def test_broken_closed_form_makes_the_check_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    real = density_module.log_density_closed_form
    monkeypatch.setattr(density_module, "log_density_closed_form", lambda x, m, s: real(x, m, s) + 1e-6)
    assert not check_density(*random_affine(3, seed=0), 100).passed
    result = run_cli("density", "--points", "100")
    assert result.exit_code == 1
    assert "check failed" in result.stderr


def test_cli_json_keys() -> None:
    result = run_cli("density", "--dim", "4", "--points", "250", "--seed", "2", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) >= {"dim", "points", "max_abs_diff_formula_vs_closed_form", "max_abs_diff_vs_torch", "passed"}
    assert payload["dim"] == 4 and payload["points"] == 250 and payload["passed"] is True
    assert payload["max_abs_diff_formula_vs_closed_form"] < 1e-10


def test_cli_with_a_given_matrix() -> None:
    result = run_cli("density", "--matrix", "[[2, 1], [0, 1]]", "--shift", "[1, -1]", "--points", "20", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dim"] == 2


def test_cli_default_run_passes() -> None:
    result = run_cli("density")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout and "log|det A^-1|" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--dim", "0"], "'--dim': 0 is not in the range 1 <= x <= 1000"),
    (["--dim", "-3"], "'--dim': -3 is not in the range 1 <= x <= 1000"),
    (["--points", "0"], "'--points': 0 is not in the range"),
    (["--matrix", "[[1, 2], [2, 4]]"], "A is singular"),
    (["--matrix", "[[0, 0], [0, 0]]"], "A is singular"),
    (["--matrix", "[[1, 2, 3]]"], "must be square"),
    (["--matrix", "[1, 2]"], "expected a matrix"),
    (["--matrix", "[[1, 2], [3]]"], "equal-length lists"),
    (["--matrix", "[[1, 0], [0, 1]]", "--shift", "[1]"], "b has 1 entries but A is 2x2"),
    (["--matrix", "[[1, 0], [0, 1]]", "--dim", "3"], "does not match --matrix"),
    (["--shift", "[1, 2]"], "--shift needs --matrix"),
    (["--matrix", "[[1, 0], [0, x]]"], "is not valid JSON"),
    (["--matrix", "[[1, 0], [0, NaN]]"], "entry NaN is outside"),
    (["--matrix", "[[1, 0], [0, \"a\"]]"], "is not a number"),
])
def test_cli_bad_input_exits_2_with_one_line(args: list[str], message: str) -> None:
    result = run_cli("density", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_library_rejects_a_singular_matrix() -> None:
    with pytest.raises(InputError, match="singular"):
        check_density([[1.0, 1.0], [1.0, 1.0]], [0.0, 0.0], 10)


def test_cli_prints_the_drawn_a_and_b_in_table_and_json() -> None:
    from bnstrip.homework.derivations.density import random_affine

    a, b = random_affine(3, 4)
    payload = json.loads(CliRunner().invoke(main, ["density", "--seed", "4", "--points", "20", "--json"]).stdout)
    assert payload["drawn"] == {"A": a.tolist(), "b": b.tolist()}
    table = CliRunner().invoke(main, ["density", "--seed", "4", "--points", "20"]).stdout
    assert f"{a.tolist()[1][2]:.10g}" in table and f"{b.tolist()[0]:.10g}" in table
