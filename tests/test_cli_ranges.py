"""Every numeric option has a range checked by click (issue 17 item 11): exit 2, ONE stderr line naming the option
and the allowed range, before any work; usage errors in general are one line; init-stats honours its budget."""
from __future__ import annotations

import itertools

import pytest
from click.testing import CliRunner

from bnstrip.cli import main
from bnstrip.errors import InputError

BIG = "9" * 5000

REFUSED = [
    (["verify", "--threads", "1e9"], "--threads", "1 <= x <= 1024"),
    (["verify", "--threads", "1000000000"], "--threads", "1024"),
    (["bench", "--threads", "100000"], "--threads", "1024"),
    (["verify", "--tolerance", "nan"], "--tolerance", "x > 0"),
    (["verify", "--tolerance", "inf"], "--tolerance", "x > 0"),
    (["verify", "--batch-size", BIG], "--batch-size", "1 <= x <= 10000"),
    (["verify", "--eps", "nan"], "--eps", "0.0 <= x < 1.0"),
    (["fuse", "a.pt", "b.pt", "--eps", "1e6"], "--eps", "1.0"),
    (["init-stats", "--budget", "1e308"], "--budget", "3600"),
    (["init-stats", "--budget", "nan"], "--budget", "0.1 <= x <= 3600.0"),
    (["init-stats", "--samples", "1e9"], "--samples", "2 <= x <= 100000000"),
    (["init-stats", "--layers", f"2,{BIG}"], "--layers", "2147483647"),
    (["kl", "--seed", "1e26"], "--seed", "0 <= x <= 4294967295"),
    (["kl", "--seed", "100000000000000000000000000"], "--seed", "4294967295"),
    (["kl", "--samples", BIG], "--samples", "100000000"),
    (["kl", "--dim", "100000"], "--dim", "1 <= x <= 1000"),
    (["density", "--points", "-1"], "--points", "1 <= x <= 1000000"),
    (["conv-grad", "--seed", "-5"], "--seed", "0 <= x"),
    (["bench", "--batch-size", "1e6"], "--batch-size", "1 <= x <= 65536"),
    (["bench", "--batch-size", "1000000"], "--batch-size", "65536"),
    (["bench", "--repeat", "1e99"], "--repeat", "100000"),
    (["density", "--matrix", "[[1e308, 0], [0, 1]]"], "--matrix", "1e+06"),
    (["density", "--matrix", "[" * 100_000 + "]" * 100_000], "--matrix", "nest at most 2"),
    (["density", "--matrix", "[1, " * 300_000 + "1" + "]" * 300_000], "--matrix", "limit"),
    (["kl", "--mu0", f"[{BIG}]", "--cov0", "[[1]]", "--mu1", "[0]", "--cov1", "[[1]]"], "--mu0", "20 digits"),
    (["kl", "--mu0", "[NaN]", "--cov0", "[[1]]", "--mu1", "[0]", "--cov1", "[[1]]"], "--mu0", "1e+06"),
]


@pytest.mark.parametrize("args,option,allowed", REFUSED, ids=[f"{a[0]} {a[-2][:12]} {a[-1][:12]}" for a, _, _ in REFUSED])
def test_out_of_range_is_one_line_exit_2_naming_option_and_range(args: list[str], option: str, allowed: str) -> None:
    result = CliRunner().invoke(main, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and option in lines[0] and allowed in lines[0] and len(lines[0]) < 400, lines
    assert result.stdout == ""


@pytest.mark.parametrize("args", [["verify", "--bogus"], ["nosuch"], ["fuse"], ["kl", "--dim"]])
def test_usage_errors_are_one_line(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("bnstrip: error: "), lines
    assert "--help" in lines[0]


def test_help_and_version_still_exit_0() -> None:
    assert CliRunner().invoke(main, ["--version"]).exit_code == 0
    result = CliRunner().invoke(main, ["kl", "--help"])
    assert result.exit_code == 0 and "--seed" in result.stdout


def test_init_stats_refuses_20000_layers_in_one_line() -> None:
    result = CliRunner().invoke(main, ["init-stats", "--layers", ",".join(["2"] * 20_001)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "--layers" in lines[0] and "1000" in lines[0], lines


def test_monte_carlo_stops_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock that advances one tick per layer: the run stops at the deadline and says so (no wall-clock figure)."""
    from bnstrip.homework.derivations import init_stats

    ticks = itertools.count()
    monkeypatch.setattr(init_stats, "_clock", lambda: float(next(ticks)))
    widths = [2] * 1001  # the deepest list allowed: 1000 layers of width 2
    mc = init_stats.monte_carlo_moments(widths, 100_000, seed=0, deadline=3500.0)
    assert mc.stopped_at_budget and mc.samples == 16 + 32 + 64  # three whole chunks of 1000 layers fit 3500 ticks
    with pytest.raises(InputError, match="fewer than the 100 a check needs; raise --budget"):
        init_stats.monte_carlo_moments(widths, 100_000, seed=0, deadline=float(next(ticks)) + 2500)
    full = init_stats.monte_carlo_moments([3, 2, 1], 64, seed=0, deadline=float("inf"))
    assert not full.stopped_at_budget and full.samples == 64


def test_closed_form_of_1000_layers_is_linear_time() -> None:
    """The closed form of the deepest allowed list agrees with the recursion (the old quadratic sum hung)."""
    from fractions import Fraction

    from bnstrip.homework.derivations.init_stats import InitLaw, closed_form_variance, exact_moments

    law = InitLaw(2, 0.5 ** 0.5, 0.5 ** 0.5, Fraction(1, 2), Fraction(1, 2), 0.0)
    widths = [2] * 1001
    assert closed_form_variance(widths, {2: law}) == exact_moments(widths, {2: law})[-1].variance


def test_bare_command_still_shows_the_help() -> None:
    result = CliRunner().invoke(main, [])
    assert "Commands:" in result.output and "fuse" in result.output
