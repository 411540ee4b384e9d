"""Problem 2: exact moments under torch's default nn.Linear init, against fresh nn.Linear layers."""
from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch
from click.testing import CliRunner

from bnstrip.cli import main
from bnstrip.homework.derivations import init_stats as stats_module
from bnstrip.homework.derivations.init_stats import (
    InitLaw,
    closed_form_variance,
    exact_moments,
    init_stats,
    monte_carlo_moments,
    read_init_law,
)
from bnstrip.errors import CheckFailed, InputError


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


def laws_for(widths: list[int]) -> dict[int, InitLaw]:
    return {n: read_init_law(n) for n in set(widths[:-1])}


@pytest.mark.parametrize("fan_in", [1, 3, 10, 257])
def test_read_law_matches_fresh_nn_linear(fan_in: int) -> None:
    law = read_init_law(fan_in, seed=3)
    assert law.weight_bound == pytest.approx(1 / math.sqrt(fan_in), rel=1e-12)
    assert law.bias_bound == pytest.approx(1 / math.sqrt(fan_in), rel=1e-12)
    assert law.weight_variance == law.bias_variance == Fraction(1, 3 * fan_in)
    # Independent of the replay: a big fresh layer stays inside the bound, reaches close to it,
    # and its empirical variance is B^2/3 within 5 standard errors (Var of U^2 is B^4 (1/5 - 1/9)).
    torch.manual_seed(1)
    layer = torch.nn.Linear(fan_in, 200_000 // fan_in + 1, dtype=torch.float64)
    weights = layer.weight.detach().reshape(-1)
    bound = 1 / math.sqrt(fan_in)
    assert float(weights.abs().max()) <= bound
    assert float(weights.abs().max()) > 0.999 * bound
    stderr = bound**2 * math.sqrt(1 / 5 - 1 / 9) / math.sqrt(weights.numel())
    assert abs(float(weights.square().mean()) - bound**2 / 3) < 5 * stderr


@pytest.mark.parametrize("layers, expected", [
    ([1, 1], Fraction(2, 3)),  # (1 + 1/1) / 3
    ([2, 1], Fraction(1, 2)),  # (1 + 1/2) / 3
    ([1, 1, 1], Fraction(5, 9)),  # (2/3 + 1) / 3
    ([1, 4, 1], Fraction(11, 36)),  # (2/3 + 1/4) / 3
    ([16, 8, 4, 1], Fraction(59, 432)),
])
def test_exact_variance_known_values(layers: list[int], expected: Fraction) -> None:
    moments = exact_moments(layers, laws_for(layers))
    assert moments[-1].variance == expected
    assert all(m.mean == 0 for m in moments)
    assert [m.width for m in moments] == layers[1:]
    assert closed_form_variance(layers, laws_for(layers)) == expected


@pytest.mark.parametrize("seed", range(5))
def test_closed_form_equals_recursion_on_random_widths(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    layers = torch.randint(1, 40, (int(torch.randint(2, 7, (1,), generator=gen)),), generator=gen).tolist()
    laws = laws_for(layers)
    depth = len(layers) - 1
    unrolled = Fraction(1, 3**depth) + sum(Fraction(1, 3 ** (depth - k) * layers[k]) for k in range(depth))
    assert exact_moments(layers, laws)[-1].variance == unrolled == closed_form_variance(layers, laws)


def test_per_sample_fresh_modules_agree_with_exact_variance() -> None:
    """Ground truth without the batched trick: one fresh nn.Linear per layer and sample."""
    layers, samples = [3, 2, 1], 4000
    torch.manual_seed(7)
    values = []
    with torch.no_grad():
        for _ in range(samples):
            y = torch.randn(layers[0], dtype=torch.float64)
            for n_in, n_out in zip(layers, layers[1:], strict=False):  # consecutive pairs
                y = torch.nn.Linear(n_in, n_out, dtype=torch.float64)(y)
            values.append(float(y[0]))
    data = torch.tensor(values, dtype=torch.float64)
    exact = float(exact_moments(layers, laws_for(layers))[-1].variance)
    centred = data - data.mean()
    var_stderr = math.sqrt(float(centred.pow(4).mean() - centred.square().mean() ** 2) / samples)
    assert abs(float(data.var()) - exact) < 4 * var_stderr
    assert abs(float(data.mean())) < 4 * math.sqrt(exact / samples)


def test_batched_monte_carlo_is_reproducible_and_close() -> None:
    first = monte_carlo_moments([5, 3, 2], 20_000, seed=11)
    assert first == monte_carlo_moments([5, 3, 2], 20_000, seed=11)
    assert first != monte_carlo_moments([5, 3, 2], 20_000, seed=12)
    exact = float(exact_moments([5, 3, 2], laws_for([5, 3, 2]))[-1].variance)
    assert abs(first.variance - exact) < 4 * first.variance_stderr


def test_wrong_law_makes_the_check_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    real = stats_module.read_init_law

    def doubled(fan_in: int, seed: int = 0) -> InitLaw:
        law = real(fan_in, seed)
        return InitLaw(fan_in, 2 * law.weight_bound, 2 * law.bias_bound, 4 * law.weight_bound_sq,
                       4 * law.bias_bound_sq, law.max_residual)

    monkeypatch.setattr(stats_module, "read_init_law", doubled)
    result = init_stats([1, 1], 20_000, seed=0)
    assert not result.passed and "variance" in result.failures[0]
    cli = run_cli("init-stats", "--layers", "1,1", "--samples", "20000")
    assert cli.exit_code == 1
    assert "check failed" in cli.stderr


def test_read_law_refuses_a_changed_torch_init(monkeypatch: pytest.MonkeyPatch) -> None:
    def normal_init(self: torch.nn.Linear) -> None:
        torch.nn.init.normal_(self.weight)
        torch.nn.init.normal_(self.bias)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", normal_init)
    with pytest.raises(CheckFailed, match="not a symmetric uniform law"):
        read_init_law(4)


def test_cli_layers_1_1_json() -> None:
    result = run_cli("init-stats", "--layers", "1,1", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) >= {"layers", "mean", "variance", "variance_fraction", "per_layer", "mc", "passed"}
    assert payload["variance_fraction"] == "2/3"
    assert payload["variance"] == pytest.approx(2 / 3, rel=1e-15)
    assert payload["mean"] == 0.0 and payload["layers"] == [1, 1] and payload["passed"] is True
    assert payload["per_layer"] == [{"layer": 1, "width": 1, "mean": 0.0, "variance": 2 / 3,
                                     "variance_fraction": "2/3"}]
    assert set(payload["mc"]) == {"samples", "mean", "variance", "mean_stderr", "variance_stderr", "stopped_at_budget"}


def test_cli_default_run_passes_its_monte_carlo_check() -> None:
    result = run_cli("init-stats", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["mc"]["samples"] == 100_000
    assert payload["variance_fraction"] == "59/432"
    mc = payload["mc"]
    assert abs(mc["mean"]) <= 4 * mc["mean_stderr"]
    assert abs(mc["variance"] - payload["variance"]) <= 4 * mc["variance_stderr"]
    assert payload["per_layer"][-1]["variance_fraction"] == payload["variance_fraction"]


def test_cli_table_shows_fraction_and_pass() -> None:
    result = run_cli("init-stats", "--layers", "1,4,1", "--samples", "5000")
    assert result.exit_code == 0, result.output
    assert "11/36" in result.stdout and "PASS" in result.stdout and "E[y_l]" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--layers", "0,1"], "width n0 = 0 is not positive"),
    (["--layers", "3,-2,1"], "width n1 = -2 is not positive"),
    (["--layers", "5"], "give at least n0,n1"),
    (["--layers", "3000,3000"], "use narrower layers"),
    (["--samples", "1"], "not in the range 2 <= x <= 100000000"),
])
def test_cli_bad_input_exits_2_with_one_line(args: list[str], message: str) -> None:
    result = run_cli("init-stats", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_cli_malformed_layers_is_a_usage_error() -> None:
    result = run_cli("init-stats", "--layers", "a,b")
    assert result.exit_code == 2
    assert "not a comma-separated list of integers" in result.stderr


def test_library_rejects_bad_widths() -> None:
    with pytest.raises(InputError, match="not positive"):
        init_stats([4, 0, 1], 10)
    with pytest.raises(InputError, match="fan_in"):
        read_init_law(0)


@pytest.mark.slow
def test_budget_picks_fewer_samples_for_a_cifar_sized_mlp_and_says_so() -> None:
    from bnstrip.homework.derivations.init_stats import MIN_BUDGET_SAMPLES, samples_for_budget

    assert samples_for_budget([16, 8, 4, 1], seconds=10) == 100_000  # small nets keep the full default
    wide = samples_for_budget([3072, 1024, 256, 10, 1], seconds=1)
    assert MIN_BUDGET_SAMPLES <= wide < 100_000



def test_cli_budget_stops_the_monte_carlo_run_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock of one tick per layer and chunk: the budget (in ticks) stops the run after 16+32+64 samples."""
    import itertools

    from bnstrip.homework.derivations import init_stats as module

    ticks = itertools.count()
    monkeypatch.setattr(module, "_clock", lambda: float(next(ticks)))
    result = run_cli("init-stats", "--layers", "64,32,16,1", "--budget", "10", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["mc"]["samples"] == 112 and payload["mc"]["stopped_at_budget"] is True
    assert "time budget stopped the run" in payload["samples_chosen_by"]
    assert payload["command"] == "init-stats" and payload["passed"] is True
    table = run_cli("init-stats", "--layers", "64,32,1", "--samples", "300")
    assert "Monte Carlo samples: --samples" in table.stdout and "Monte Carlo over 300" in table.stdout
