"""Problems 5 and 6: Gaussian KL in closed form against torch.distributions, an explicit formula and Monte Carlo."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from bnstrip.cli import main
from bnstrip.homework.derivations import kl as kl_module
from bnstrip.homework.derivations.kl import (
    check_kl,
    kl_closed_form,
    kl_monte_carlo,
    kl_normal_1d,
    make_gaussian,
    random_gaussian_pair,
)
from bnstrip.errors import InputError


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


def explicit_formula(mu0, cov0, mu1, cov1) -> float:
    """Problem 6 written literally, with an explicit inverse and determinants (a different route from Cholesky)."""
    inverse = torch.linalg.inv(cov1)
    delta = mu1 - mu0
    return float(0.5 * (torch.trace(inverse @ cov0) + delta @ inverse @ delta - mu0.numel()
                        + torch.log(torch.det(cov1) / torch.det(cov0))))


def test_known_one_dimensional_value() -> None:
    """KL(N(0,1) || N(1,2)), 2 the variance: 1/2 (1/2 + 1/2 - 1 + ln 2) = ln(2)/2."""
    p, q = make_gaussian([0.0], [[1.0]]), make_gaussian([1.0], [[2.0]])
    f64 = lambda value: torch.tensor(value, dtype=torch.float64)  # noqa: E731
    truth = float(kl_divergence(Normal(f64(0.0), f64(1.0)), Normal(f64(1.0), f64(2.0).sqrt())))
    assert truth == pytest.approx(math.log(2) / 2, abs=1e-15)
    assert kl_closed_form(p, q) == pytest.approx(math.log(2) / 2, abs=1e-15)
    assert kl_normal_1d(0.0, 1.0, 1.0, 2.0) == pytest.approx(math.log(2) / 2, abs=1e-15)


def test_cli_known_value_json() -> None:
    result = run_cli("kl", "--mu0", "[0]", "--cov0", "[[1]]", "--mu1", "[1]", "--cov1", "[[2]]", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) >= {"dim", "kl", "kl_torch", "kl_mc", "kl_mc_stderr", "passed"}
    assert "kl_per_coordinate" not in payload
    assert payload["kl"] == pytest.approx(math.log(2) / 2, abs=1e-15)
    assert payload["kl_torch"] == pytest.approx(math.log(2) / 2, abs=1e-15)
    assert abs(payload["kl_mc"] - math.log(2) / 2) < 4 * payload["kl_mc_stderr"]
    assert payload["dim"] == 1 and payload["passed"] is True


def test_kl_of_a_gaussian_with_itself_is_zero() -> None:
    p = make_gaussian([1.0, -2.0], [[2.0, 0.3], [0.3, 1.0]])
    assert kl_closed_form(p, p) == pytest.approx(0.0, abs=1e-14)
    result = check_kl(p, p, 1000)
    assert result.passed and result.kl_mc == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("dim", [1, 2, 4, 10, 40])
@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_matches_torch_and_explicit_formula(dim: int, seed: int) -> None:
    p, q = random_gaussian_pair(dim, seed=seed)
    torch_value = float(kl_divergence(MultivariateNormal(p.mean, covariance_matrix=p.covariance),
                                      MultivariateNormal(q.mean, covariance_matrix=q.covariance)))
    mine = kl_closed_form(p, q)
    assert mine == pytest.approx(torch_value, rel=1e-11, abs=1e-12)
    assert mine == pytest.approx(explicit_formula(p.mean, p.covariance, q.mean, q.covariance), rel=1e-9, abs=1e-10)
    assert mine >= 0  # Problem 5a
    assert kl_closed_form(q, p) >= 0


def test_kl_is_not_symmetric_but_both_directions_are_nonnegative() -> None:
    p, q = make_gaussian([0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]]), make_gaussian([1.0, 0.0], [[4.0, 0.0], [0.0, 0.25]])
    forward, backward = kl_closed_form(p, q), kl_closed_form(q, p)
    assert forward > 0 and backward > 0 and abs(forward - backward) > 0.1


@pytest.mark.parametrize("dim", [1, 3, 8])
def test_independent_coordinates_sum(dim: int) -> None:
    """Problem 5b: with diagonal covariances the joint KL is the sum of the 1-D KLs (each checked against torch)."""
    p, q = random_gaussian_pair(dim, independent=True, seed=dim)
    result = check_kl(p, q, 20_000, seed=1, independent=True)
    assert result.passed and result.kl_per_coordinate is not None
    for i, value in enumerate(result.kl_per_coordinate):
        truth = float(kl_divergence(Normal(p.mean[i], p.covariance[i, i].sqrt()),
                                    Normal(q.mean[i], q.covariance[i, i].sqrt())))
        assert value == pytest.approx(truth, rel=1e-12, abs=1e-14)
        assert value >= 0
    assert result.kl_sum == pytest.approx(result.kl, rel=1e-12)


def test_monte_carlo_agrees_and_is_reproducible() -> None:
    p, q = random_gaussian_pair(5, seed=2)
    mean, stderr = kl_monte_carlo(p, q, 50_000, seed=3)
    assert (mean, stderr) == kl_monte_carlo(p, q, 50_000, seed=3)
    assert abs(mean - kl_closed_form(p, q)) < 4 * stderr
    assert 0 < stderr < 0.1


def test_broken_closed_form_makes_the_check_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    real = kl_module.kl_closed_form
    monkeypatch.setattr(kl_module, "kl_closed_form", lambda p, q: real(p, q) + 0.05)
    p, q = random_gaussian_pair(2, seed=0)
    result = check_kl(p, q, 20_000)
    assert not result.passed and any("differs from torch" in f for f in result.failures)
    cli = run_cli("kl", "--dim", "2", "--samples", "20000")
    assert cli.exit_code == 1
    assert "check failed" in cli.stderr


def test_negative_kl_is_reported_as_a_violation_of_5a(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kl_module, "kl_closed_form", lambda p, q: -0.5)
    monkeypatch.setattr(kl_module, "kl_torch", lambda p, q: -0.5)
    p, q = random_gaussian_pair(1, seed=0)
    assert any("Problem 5a" in f for f in check_kl(p, q, 1000).failures)


def test_cli_default_run_passes_with_its_monte_carlo() -> None:
    result = run_cli("kl", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["dim"] == 3 and payload["samples"] == 100_000 and payload["passed"] is True
    assert abs(payload["kl_mc"] - payload["kl"]) < 4 * payload["kl_mc_stderr"]


def test_cli_independent_json_and_table() -> None:
    args = ["kl", "--mu0", "[0, 1]", "--cov0", "[[1, 0], [0, 2]]", "--mu1", "[1, 1]", "--cov1", "[[2, 0], [0, 1]]",
            "--independent"]
    result = run_cli(*args, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    first = math.log(2) / 2  # N(0,1) || N(1,2)
    second = 0.5 * (2 - 1 + math.log(1 / 2))  # N(1,2) || N(1,1)
    assert payload["kl_per_coordinate"] == pytest.approx([first, second], abs=1e-15)
    assert payload["kl_sum"] == pytest.approx(first + second, abs=1e-15)
    assert payload["kl"] == pytest.approx(first + second, abs=1e-14)
    table = run_cli(*args)
    assert table.exit_code == 0 and "sum of the 1-D KLs" in table.stdout and "PASS" in table.stdout


def test_cli_random_independent_pair() -> None:
    result = run_cli("kl", "--dim", "4", "--independent", "--samples", "5000", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["kl_per_coordinate"]) == 4


GOOD = {"--mu0": "[0, 0]", "--cov0": "[[1, 0], [0, 1]]", "--mu1": "[1, 0]", "--cov1": "[[2, 0], [0, 1]]"}


def _with(**changes: str) -> list[str]:
    options = {**GOOD, **{f"--{k}": v for k, v in changes.items()}}
    return [item for pair in options.items() for item in pair]


@pytest.mark.parametrize("args, message", [
    (_with(cov0="[[1, 0.5], [0.2, 1]]"), "not symmetric"),
    (_with(cov1="[[1, 2], [2, 1]]"), "not positive definite"),
    (_with(cov0="[[0, 0], [0, 0]]"), "not positive definite"),
    (_with(cov0="[[1, 0, 0], [0, 1, 0], [0, 0, 1]]"), "give a 2x2 matrix"),
    (_with(mu1="[1, 0, 0]", cov1="[[1, 0, 0], [0, 1, 0], [0, 0, 1]]"), "same dimension"),
    (_with(mu0="[0, 0"), "is not valid JSON"),
    (_with(mu0='{"a": 1}'), "is not a JSON array"),
    (_with(mu0="[true, 0]"), "is not a number"),
    (_with(mu0="[[0, 0]]"), "expected a vector"),
    (_with(cov0="[1, 0]"), "expected a matrix"),
    (_with(mu0="[NaN, 0]"), "--mu0: entry NaN is outside"),
    (_with(cov0="[[1, 0.5], [0.5, 1]]") + ["--independent"], "--independent needs diagonal covariances"),
    (["--mu0", "[0]", "--cov0", "[[1]]", "--mu1", "[1]"], "missing --cov1"),
    (["--mu0", "[0]", "--dim", "2"], "not both"),
    (["--dim", "0"], "'--dim': 0 is not in the range"),
    (["--samples", "1"], "'--samples': 1 is not in the range"),
])
def test_cli_bad_input_exits_2_with_one_line(args: list[str], message: str) -> None:
    result = run_cli("kl", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_library_rejects_bad_covariances() -> None:
    with pytest.raises(InputError, match="not positive definite"):
        make_gaussian([0.0], [[-1.0]])
    with pytest.raises(InputError, match="not symmetric"):
        make_gaussian([0.0, 0.0], [[1.0, 1e-3], [0.0, 1.0]])


def test_cli_prints_the_drawn_gaussians_in_table_and_json() -> None:
    from bnstrip.homework.derivations.kl import random_gaussian_pair

    p, q = random_gaussian_pair(3, False, 5)
    payload = json.loads(CliRunner().invoke(main, ["kl", "--dim", "3", "--seed", "5", "--samples", "2000",
                                                   "--json"]).stdout)
    assert payload["drawn"] == {"mu0": p.mean.tolist(), "cov0": p.covariance.tolist(), "mu1": q.mean.tolist(),
                                "cov1": q.covariance.tolist()}
    table = CliRunner().invoke(main, ["kl", "--dim", "3", "--seed", "5", "--samples", "2000"]).stdout
    assert f"{p.mean.tolist()[0]:.10g}" in table and f"{q.covariance.tolist()[2][2]:.10g}" in table
