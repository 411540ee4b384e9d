"""Commands of the maths group (Problems 2-6 of homework 6); registered on the main group by bnstrip.cli.

Each command prints a closed form and its numerical check against PyTorch.  Only click is imported
here; torch and bnstrip.homework.derivations are imported inside the command bodies so `bnstrip --help` stays fast.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import click

from bnstrip.cli.common import (
    Progress,
    core_json,
    emit_json,
    fmt,
    handle_errors,
    make_table,
    parse_int_list,
    stdout_console,
)
from bnstrip.cli.types import MAX_BUDGET_SECONDS, SEED, BoundedFloat, BoundedInt, parse_json_array
from bnstrip.errors import CheckFailed, InputError

if TYPE_CHECKING:  # the CLI imports the maths only when a command runs
    from bnstrip.homework.derivations.init_stats import InitStatsResult

SEED_HELP = "Seed of every random draw, for reproducible figures."
JSON_HELP = "Print one JSON object on stdout."


def _table(title: str, columns: list[str], rows: list[list[Any]]):
    """clikit.make_table with Rich markup escaped: the maths is full of square brackets (E[y_l], g_l[i])."""
    from rich.markup import escape

    return make_table(escape(title), [escape(c) for c in columns], [[escape(str(cell)) for cell in row] for row in rows])


def _say(text: str) -> None:
    """One plain line to stdout (no Rich markup, so brackets survive)."""
    stdout_console().print(text, markup=False)


def _finish(passed: bool, failures: list[str], as_json: bool) -> None:
    """PASS/FAIL for people; a failed check raises CheckFailed (one stderr line, exit 1) with its reasons."""
    if not as_json:
        stdout_console().print("[bold green]PASS[/]" if passed else "[bold red]FAIL[/]")
    if not passed:
        raise CheckFailed("; ".join(failures) or "a check missed its tolerance")


def _matrix_rows(name: str, value: Any, digits: int = 10) -> list[list[str]]:
    """Rows [name, row text] for a drawn vector or matrix, so a student can check a figure by hand."""
    rows = value if value and isinstance(value[0], list) else [value]
    return [[name if i == 0 else "", "[" + ", ".join(f"{v:.{digits}g}" for v in row) + "]"] for i, row in enumerate(rows)]


def _drawn_table(title: str, named: list[tuple[str, Any]]):
    """The random (or given) inputs of a maths command as a table: every entry, 10 significant digits."""
    rows = [row for name, value in named for row in _matrix_rows(name, value)]
    return _table(f"{title} (--json has them at full precision)", ["input", "value"], rows)


# --------------------------------------------------------------------------- init-stats (Problem 2)


def _init_stats_json(result: InitStatsResult, how: str, seed: int) -> dict[str, Any]:
    """init-stats --json beyond the keys every command shares: exact fractions as strings, MC figures as floats."""
    mc = result.mc
    return {
        "layers": result.layers, "mean": float(result.mean), "variance": float(result.variance),
        "variance_fraction": str(result.variance),
        "per_layer": [{"layer": m.layer, "width": m.width, "mean": float(m.mean), "variance": float(m.variance),
                       "variance_fraction": str(m.variance)} for m in result.per_layer],
        "mc": {"samples": mc.samples, "mean": mc.mean, "variance": mc.variance, "mean_stderr": mc.mean_stderr,
               "variance_stderr": mc.variance_stderr, "stopped_at_budget": mc.stopped_at_budget},
        "samples_chosen_by": how,
        "init_law": [{"fan_in": law.fan_in, "weight_bound": law.weight_bound, "bias_bound": law.bias_bound,
                      "weight_variance_fraction": str(law.weight_variance),
                      "bias_variance_fraction": str(law.bias_variance)} for law in result.laws],
        "recursion": result.recursion_text, "closed_form": result.closed_form_text, "seed": seed,
        "failures": result.failures,
    }


def _print_init_stats(result: InitStatsResult, how: str, seed: int) -> None:
    """init-stats as tables: the init law torch uses, the exact moments per layer, the Monte Carlo check."""
    import torch

    from bnstrip.homework.derivations.init_stats import MC_STDERR_BAR, in_stderrs

    mc, console = result.mc, stdout_console()
    console.print(_table(
        f"Default nn.Linear init read off torch {torch.__version__}",
        ["fan_in", "weight ~", "bias ~", "Var(w)", "Var(b)"],
        [[law.fan_in, f"U(+-{law.weight_bound:.6g})", f"U(+-{law.bias_bound:.6g})", law.weight_variance,
          law.bias_variance] for law in result.laws]))
    _say("mean:        E[y_l,i] = sum_j E[w_ij] E[y_{l-1,j}] + E[b_i] = 0  (w, b independent, mean 0)")
    _say(f"recursion:   {result.recursion_text}")
    _say(f"closed form: {result.closed_form_text} = {result.closed_form_variance}")
    console.print(_table(
        f"Every coordinate of y_l, layers {','.join(map(str, result.layers))}",
        ["l", "n_l", "E[y_l]", "Var(y_l) exact", "Var(y_l)"],
        [[m.layer, m.width, m.mean, m.variance, f"{float(m.variance):.10g}"] for m in result.per_layer]))
    exact = float(result.variance)
    console.print(_table(
        f"Monte Carlo over {mc.samples} fresh default-initialised networks (seed {seed}), y_L[0]",
        ["figure", "exact", "Monte Carlo", "std. error", "|diff| / std. error", "bar"],
        [["mean", "0", f"{mc.mean:.6g}", fmt(mc.mean_stderr), f"{in_stderrs(mc.mean, mc.mean_stderr):.2f}",
          f"<= {MC_STDERR_BAR:g}"],
         ["variance", f"{exact:.6g}", f"{mc.variance:.6g}", fmt(mc.variance_stderr),
          f"{in_stderrs(mc.variance - exact, mc.variance_stderr):.2f}", f"<= {MC_STDERR_BAR:g}"]]))
    _say(f"Monte Carlo samples: {how}")


@click.command("init-stats")
@click.option("--layers", default="16,8,4,1", show_default=True, metavar="n0,n1,...,nL",
              help="Widths of the identity-activation MLP, input first.")
@click.option("--samples", default=None, type=BoundedInt(2, 100_000_000),
              help="Monte Carlo samples (fresh default-initialised layers and a fresh x each). Default: as many as "
                   "fit --budget, at most 100000.")
@click.option("--budget", default=10.0, show_default=True, type=BoundedFloat(0.1, MAX_BUDGET_SECONDS), metavar="SECONDS",
              help="Time budget of the Monte Carlo check when --samples is not given.")
@click.option("--seed", default=0, show_default=True, type=SEED, help=SEED_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@handle_errors
def init_stats_command(layers: str, samples: int | None, budget: float, seed: int, as_json: bool) -> None:
    """Problem 2: mean and variance of y_L under PyTorch's default nn.Linear init, exact and by Monte Carlo.

    The init law is read off the installed torch; the variances are exact fractions.  Exit 1 when the
    Monte Carlo mean or variance is more than 4 standard errors from the exact value.
    """
    from bnstrip.homework.derivations.init_stats import DEFAULT_SAMPLES, init_stats, validate_layers

    started = time.perf_counter()
    widths = validate_layers(parse_int_list(layers, "--layers"))
    with Progress("Monte Carlo", after=2.0) as progress:
        result = init_stats(widths, samples or DEFAULT_SAMPLES, seed, progress=progress,
                            budget=budget if samples is None else None)
    if samples is not None:
        how = "--samples"
    elif result.mc.stopped_at_budget:
        how = (f"{result.mc.samples} samples, where the {budget:g} s time budget stopped the run; --samples N sets "
               "the count (the std. error shrinks as 1/sqrt(N))")
    else:
        how = (f"the default {result.mc.samples} samples fit the {budget:g} s time budget; --samples N sets the "
               "count (the std. error shrinks as 1/sqrt(N))")
    if as_json:
        emit_json({**core_json("init-stats", result.passed, time.perf_counter() - started),
                   **_init_stats_json(result, how, seed)})
    else:
        _print_init_stats(result, how, seed)
    _finish(result.passed, result.failures, as_json)


# --------------------------------------------------------------------------- conv-grad (Problem 3)


def _short_vector(values: list[float], limit: int = 6) -> str:
    shown = ", ".join(f"{v:.4g}" for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


@click.command("conv-grad")
@click.option("--filters", default="5,3,3,2", show_default=True, metavar="f1,...,fL",
              help="Filter sizes; n0 = 1 + sum(f_l - 1) so that n_L = 1.")
@click.option("--activation", default="tanh", show_default=True,
              type=click.Choice(["tanh", "sigmoid", "softplus", "identity"]), help="sigma of the hidden layers.")
@click.option("--seed", default=0, show_default=True, type=SEED, help=SEED_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@handle_errors
def conv_grad_command(filters: str, activation: str, seed: int, as_json: bool) -> None:
    """Problem 3: dy_L/dw_l and dy_L/db_l of a 1-D conv net by backprop with (transposed) convolutions.

    Checked against torch.autograd and against explicit matrices A_w built only for the check.
    Exit 1 when either differs by more than 1e-10 relative to the largest gradient.
    """
    from bnstrip.homework.derivations.conv_grad import RECURSION_LINES, check_conv_grad, random_conv_net

    started = time.perf_counter()
    sizes = parse_int_list(filters, "--filters")
    net = random_conv_net(sizes, seed)
    result = check_conv_grad(net, activation)
    drawn = {"x": net.x.tolist(), "w": [w.tolist() for w in net.filters], "b": [float(b) for b in net.biases]}
    if as_json:
        emit_json({
            **core_json("conv-grad", result.passed, time.perf_counter() - started), "drawn": drawn,
            "n0": result.n0,
            "layers": [{"layer": g.layer, "filter_size": g.filter_size, "n_out": g.n_out, "grad_w": g.grad_w,
                        "grad_b": g.grad_b, "max_abs_diff_autograd": g.max_abs_diff_autograd,
                        "max_abs_diff_matrix": g.max_abs_diff_matrix} for g in result.layers],
            "activation": result.activation, "y_L": result.y_L,
            "tolerance": result.tolerance, "seed": seed,
        })
    else:
        console = stdout_console()
        _say(f"n0 = 1 + sum(f_l - 1) = {result.n0}, sigma = {result.activation}, y_L = {result.y_L:.10g}")
        for line in RECURSION_LINES:
            _say(line)
        console.print(_drawn_table(f"Drawn (seed {seed}): x ~ N(0, I), w_l ~ N(0, I/f_l), b_l ~ N(0, 1/4)",
                                   [("x", drawn["x"])] + [(f"w_{i + 1}", w) for i, w in enumerate(drawn["w"])]
                                   + [("b_1..b_L", drawn["b"])]))
        console.print(_table(
            f"Gradients of y_L (filters {','.join(map(str, sizes))}, seed {seed}); tolerance {fmt(result.tolerance)}",
            ["l", "f_l", "n_l", "dy_L/db_l", "|diff| autograd", "|diff| matrix", "dy_L/dw_l"],
            [[g.layer, g.filter_size, g.n_out, f"{g.grad_b:.6g}", fmt(g.max_abs_diff_autograd),
              fmt(g.max_abs_diff_matrix), _short_vector(g.grad_w)] for g in result.layers]))
    failures = [] if result.passed else [
        f"layer {g.layer}: backprop differs from autograd by {g.max_abs_diff_autograd:.3g} and from the explicit "
        f"matrices by {g.max_abs_diff_matrix:.3g} (tolerance {result.tolerance:.3g})"
        for g in result.layers if max(g.max_abs_diff_autograd, g.max_abs_diff_matrix) > result.tolerance]
    _finish(result.passed, failures, as_json)


# --------------------------------------------------------------------------- density (Problem 4)


@click.command("density")
@click.option("--dim", default=None, type=BoundedInt(1, 1000), help="Dimension n of a random invertible A and b (default 3).")
@click.option("--points", default=1000, show_default=True, type=BoundedInt(1, 1_000_000), help="Points x drawn from X = AY + b.")
@click.option("--matrix", default=None, metavar="JSON", help="Use this A instead of a random one, e.g. '[[2,1],[0,1]]'.")
@click.option("--shift", default=None, metavar="JSON", help="With --matrix: use this b (default 0), e.g. '[1,-1]'.")
@click.option("--seed", default=0, show_default=True, type=SEED, help=SEED_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@handle_errors
def density_command(dim: int | None, points: int, matrix: str | None, shift: str | None, seed: int,
                    as_json: bool) -> None:
    """Problem 4: log-density of X = AY + b, Y ~ N(0, I), by change of variables vs N(b, A A^T) vs torch.

    Exit 1 when the three evaluations differ by more than the tolerance (which grows with cond(A)^2).
    """
    from bnstrip.homework.derivations.density import check_density, random_affine, validate_sizes

    started = time.perf_counter()
    if matrix is None:
        if shift is not None:
            raise InputError("--shift needs --matrix (the random A comes with a random b)")
        validate_sizes(3 if dim is None else dim, points)
        a, b = random_affine(3 if dim is None else dim, seed)
    else:
        a = parse_json_array(matrix, "--matrix")
        b = parse_json_array(shift, "--shift")
        if b is None:
            b = [0.0] * len(a)
        if dim is not None and dim != len(a):
            raise InputError(f"--dim {dim} does not match --matrix, which has {len(a)} rows; drop --dim")
    result = check_density(a, b, points, seed, "--matrix", "--shift")
    drawn = {"A": a.tolist() if hasattr(a, "tolist") else a, "b": b.tolist() if hasattr(b, "tolist") else b}
    if as_json:
        emit_json({
            **core_json("density", result.passed, time.perf_counter() - started), "drawn": drawn,
            "dim": result.dim, "points": result.points,
            "max_abs_diff_formula_vs_closed_form": result.max_abs_diff_formula_vs_closed_form,
            "max_abs_diff_vs_torch": result.max_abs_diff_vs_torch,
            "tolerance": result.tolerance, "condition_number": result.condition_number, "seed": seed,
        })
    else:
        console = stdout_console()
        _say("change of variables: log p_X(x) = log p_Y(A^-1 (x - b)) + log|det A^-1|")
        _say("closed form:         log N(x; b, A A^T);   reference: torch MultivariateNormal.log_prob")
        source = "given" if matrix is not None else f"drawn, seed {seed}"
        console.print(_drawn_table(f"A and b ({source})", [("A", drawn["A"]), ("b", drawn["b"])]))
        console.print(_table(
            f"log p_X at the first points (n = {result.dim}, cond(A) = {result.condition_number:.3g}, seed {seed})",
            ["x", "change of variables", "closed form", "torch"],
            [[_short_vector(x, 4), f"{v[0]:.12g}", f"{v[1]:.12g}", f"{v[2]:.12g}"]
             for x, v in zip(result.sample_points, result.sample_log_densities, strict=True)]))
        console.print(_table(
            f"Max |difference| over {result.points} points",
            ["comparison", "max |diff|", "tolerance"],
            [["change of variables vs closed form", fmt(result.max_abs_diff_formula_vs_closed_form),
              fmt(result.tolerance)],
             ["both vs torch", fmt(result.max_abs_diff_vs_torch), fmt(result.tolerance)]]))
    failures = [] if result.passed else [
        f"log-densities differ by {max(result.max_abs_diff_formula_vs_closed_form, result.max_abs_diff_vs_torch):.3g} "
        f"(tolerance {result.tolerance:.3g})"]
    _finish(result.passed, failures, as_json)


# --------------------------------------------------------------------------- kl (Problems 5 and 6)


@click.command("kl")
@click.option("--mu0", default=None, metavar="JSON", help="Mean of the first Gaussian, e.g. '[0,0]'.")
@click.option("--cov0", default=None, metavar="JSON", help="Covariance of the first Gaussian, e.g. '[[1,0],[0,1]]'.")
@click.option("--mu1", default=None, metavar="JSON", help="Mean of the second Gaussian.")
@click.option("--cov1", default=None, metavar="JSON", help="Covariance of the second Gaussian.")
@click.option("--dim", default=None, type=BoundedInt(1, 1000), help="Draw a random pair of this dimension instead (default 3).")
@click.option("--independent", is_flag=True,
              help="Diagonal covariances; also print the per-coordinate 1-D KLs (Problem 5b).")
@click.option("--samples", default=100_000, show_default=True, type=BoundedInt(2, 100_000_000), help="Monte Carlo samples of log f - log g.")
@click.option("--seed", default=0, show_default=True, type=SEED, help=SEED_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@handle_errors
def kl_command(mu0: str | None, cov0: str | None, mu1: str | None, cov1: str | None, dim: int | None,
               independent: bool, samples: int, seed: int, as_json: bool) -> None:
    """Problems 5-6: KL(N(mu0, cov0) || N(mu1, cov1)) in closed form vs torch vs Monte Carlo.

    Give all four of --mu0 --cov0 --mu1 --cov1, or --dim for a random pair.  Exit 1 when the closed form
    and torch disagree, the Monte Carlo estimate is more than 4 standard errors off, a KL is negative
    (Problem 5a) or, with --independent, the 1-D KLs do not sum to the joint KL (Problem 5b).
    """
    from bnstrip.homework.derivations.kl import check_kl, make_gaussian, random_gaussian_pair

    started = time.perf_counter()
    given = {name: text for name, text in (("--mu0", mu0), ("--cov0", cov0), ("--mu1", mu1), ("--cov1", cov1))
             if text is not None}
    if given:
        if dim is not None:
            raise InputError("give either --mu0/--cov0/--mu1/--cov1 or --dim, not both")
        missing = [name for name in ("--mu0", "--cov0", "--mu1", "--cov1") if name not in given]
        if missing:
            raise InputError(f"missing {', '.join(missing)}: give all four of --mu0 --cov0 --mu1 --cov1, or --dim")
        p = make_gaussian(parse_json_array(mu0, "--mu0"), parse_json_array(cov0, "--cov0"), "--mu0", "--cov0")
        q = make_gaussian(parse_json_array(mu1, "--mu1"), parse_json_array(cov1, "--cov1"), "--mu1", "--cov1")
    else:
        p, q = random_gaussian_pair(3 if dim is None else dim, independent, seed)
    result = check_kl(p, q, samples, seed, independent)
    drawn = {"mu0": p.mean.tolist(), "cov0": p.covariance.tolist(), "mu1": q.mean.tolist(), "cov1": q.covariance.tolist()}
    if as_json:
        payload: dict[str, Any] = {**core_json("kl", result.passed, time.perf_counter() - started), "drawn": drawn,
                                   "dim": result.dim, "kl": result.kl, "kl_torch": result.kl_torch,
                                   "kl_mc": result.kl_mc, "kl_mc_stderr": result.kl_mc_stderr}
        if independent:
            payload.update({"kl_per_coordinate": result.kl_per_coordinate, "kl_sum": result.kl_sum})
        payload.update({"samples": result.samples, "tolerance": result.tolerance, "seed": seed,
                        "failures": result.failures})
        emit_json(payload)
    else:
        console = stdout_console()
        _say("KL = 1/2 (tr(S1^-1 S0) + (mu1 - mu0)^T S1^-1 (mu1 - mu0) - d + log(det S1 / det S0))")
        _say("closed form via Cholesky factors; Monte Carlo: mean of log f(X) - log g(X), X ~ f")
        source = "given" if given else f"drawn, seed {seed}"
        console.print(_drawn_table(f"f = N(mu0, S0), g = N(mu1, S1) ({source})",
                                   [(name, drawn[name]) for name in ("mu0", "cov0", "mu1", "cov1")]))
        rows = [["closed form", f"{result.kl:.12g}", ""],
                ["torch kl_divergence", f"{result.kl_torch:.12g}",
                 f"|diff| {fmt(abs(result.kl - result.kl_torch))} (tolerance {fmt(result.tolerance)})"],
                [f"Monte Carlo, {result.samples} samples", f"{result.kl_mc:.6g}",
                 f"std. error {fmt(result.kl_mc_stderr)}"]]
        if independent and result.kl_per_coordinate is not None and result.kl_sum is not None:
            rows += [[f"1-D KL of coordinate {i}", f"{value:.12g}", ""]
                     for i, value in enumerate(result.kl_per_coordinate)]
            rows.append(["sum of the 1-D KLs", f"{result.kl_sum:.12g}",
                         f"|diff| {fmt(abs(result.kl_sum - result.kl))}"])
        console.print(_table(f"KL divergence, d = {result.dim}, seed {seed}", ["figure", "value", "check"], rows))
    _finish(result.passed, result.failures, as_json)


