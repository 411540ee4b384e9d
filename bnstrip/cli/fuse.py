"""`bnstrip fuse`: fold a checkpoint's BatchNorms and write the folded state_dict (smallNet or any --arch model).

Only click is imported at module level; the library is imported inside the command.
"""
from __future__ import annotations


import click

from bnstrip.cli.common import core_json, emit_json, fmt, handle_errors, make_table, plain, stdout_console, warn
from bnstrip.cli.types import EPS


@click.command()
@click.argument("input_path", metavar="IN", type=click.Path(dir_okay=True, path_type=str))
@click.argument("output_path", metavar="OUT", type=click.Path(path_type=str))
@click.option("--eps", type=EPS, default=None, help="BatchNorm eps (not stored in a state_dict). Default: the model's own (1e-5 for smallNet).")
@click.option("--arch", default=None, metavar="MODULE:CALLABLE", help="Build this model (a class or factory) instead of smallNet; IN must load into it strictly. Runs your code, by design.")
@click.option("--input-shape", default=None, metavar="N,C,H,W", help="Shape of the random inputs for tracing and the self-check (with --arch), batch dimension first.")
@click.option("--keep-structure", is_flag=True, help="With --arch: keep every module (folded BNs become exact identity-plus-bias), so OUT loads into the original class; no speed-up.")
@click.option("--reparameterize", is_flag=True, help="With --arch: also merge sums of parallel branches (RepVGG, MobileOne, ACNet blocks) into one conv each, proven like the folds; not with --keep-structure.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (never the input).")
@click.option("--allow-overflow", is_flag=True, help="Write even if a folded half-precision value overflows (warns instead of refusing).")
@click.option("--dtype", type=click.Choice(["keep", "float32", "float64"]), default="keep", show_default=True, help="Convert IN to this dtype before folding; OUT is written in it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--strict", is_flag=True, help="Exit 1 if any BatchNorm was not folded (OUT is still written): a CI gate.")
@handle_errors
def fuse(input_path: str, output_path: str, eps: float | None, arch: str | None, input_shape: str | None,
         keep_structure: bool, reparameterize: bool, force: bool, allow_overflow: bool, dtype: str,
         as_json: bool, strict: bool = False) -> None:
    """Fold every BatchNorm of the checkpoint IN and write the folded state_dict to OUT (.pt or .safetensors).

    Without --arch, IN is a smallNetTrain checkpoint and OUT a smallNetTest state_dict.
    The folded model is checked against the original on random inputs before anything is written.
    """
    from bnstrip.cli.program import fuse_program_job  # issue 13: IN.pt2 (by content) or OUT.pt2

    if fuse_program_job(input_path, output_path, arch=arch, input_shape=input_shape, keep_structure=keep_structure,
                        reparameterize=reparameterize, eps=eps, force=force, allow_overflow=allow_overflow,
                        dtype=dtype, as_json=as_json):
        return
    if arch is not None:
        _fuse_arch(input_path, output_path, arch, input_shape, keep_structure, eps, force, allow_overflow, dtype,
                   as_json, reparameterize, strict)
        return
    if keep_structure or input_shape or reparameterize:
        raise click.UsageError("--keep-structure, --reparameterize and --input-shape go with --arch")
    _fuse_smallnet(input_path, output_path, eps, force, allow_overflow, dtype, as_json)


def _fuse_smallnet(input_path: str, output_path: str, eps: float | None, force: bool, allow_overflow: bool,
                   dtype: str, as_json: bool) -> None:
    from bnstrip.homework.models import SmallNetTrain
    from bnstrip.pipeline import fuse_file

    result = fuse_file(input_path, output_path, SmallNetTrain, eps=eps, force=force, allow_overflow=allow_overflow,
                       dtype=dtype)
    for note in result.unwrapped + result.warnings:  # after the write, so a failure stays a single stderr line
        warn(f"{input_path}: {note}")
    seconds, eps_value, loaded_format = result.seconds, result.eps, result.source_format
    if as_json:
        emit_json({
            **core_json("fuse", True, seconds),
            "input": input_path, "output": output_path, "format": loaded_format, "eps": eps_value,
            "dtype": result.dtype,
            "pairs": [{"producer": p, "bn": b} for p, b in result.pairs],
            "self_check_max_abs_diff": result.self_check.max_abs_diff,
            "self_check_tolerance": result.self_check.tolerance,
            "unwrapped": result.unwrapped, "warnings": result.warnings,
        })
        return
    console = stdout_console()
    console.print(plain(f"folded {input_path} -> {output_path} (smallNetTest state_dict, {result.dtype})"))
    console.print(make_table("", ["producer", "BatchNorm", "folded into"],
                             [[p, b, "weight, bias"] for p, b in result.pairs], markup=False))
    console.print(f"self-check: max |diff| {fmt(result.self_check.max_abs_diff)} on {result.self_check.samples} random "
                  f"inputs (tolerance {fmt(result.self_check.tolerance)}), {seconds:.2f} s")


def _fuse_arch(input_path: str, output_path: str, arch: str, input_shape: str | None, keep_structure: bool,
               eps: float | None, force: bool, allow_overflow: bool, dtype: str, as_json: bool,
               reparameterize: bool = False, strict: bool = False) -> None:
    import functools

    from bnstrip.arch import import_arch, import_callable
    from bnstrip.cli.common import parse_int_list
    from bnstrip.core.compare import seeded_inputs
    from bnstrip.errors import InputError
    from bnstrip.pipeline import fuse_file

    if not input_shape:
        raise InputError(f"--arch {arch}: --input-shape is required to trace and self-check the model, "
                         "e.g. --input-shape 1,3,224,224")
    shape = parse_int_list(input_shape, "--input-shape")
    if any(d <= 0 for d in shape):
        raise InputError(f"--input-shape {input_shape}: every dimension must be positive")
    import_callable(arch)  # a wrong --arch is named before IN is read (without building a model: memory)
    report = fuse_file(input_path, output_path, functools.partial(import_arch, arch), seeded_inputs(shape, seed=0),
                       eps=eps, keep_structure=keep_structure, allow_overflow=allow_overflow, force=force, dtype=dtype,
                       arch=arch, reparameterize=reparameterize)
    for note in report.unwrapped:
        warn(f"{input_path}: {note}")
    for note in report.warnings:
        warn(note)
    _warn_unfolded(input_path, report.result)
    if as_json:
        emit_json({**core_json("fuse", not (strict and report.result.skipped), report.seconds), **report.to_dict()})
    else:
        _print_arch(input_path, output_path, arch, report)
    if strict and report.result.skipped:
        from bnstrip.errors import CheckFailed

        bn, reason = report.result.skipped[0]
        raise CheckFailed(f"{input_path}: --strict: {len(report.result.skipped)} BatchNorm(s) not folded ({output_path} "
                          f"was written), first {bn}: {reason}")


def _warn_unfolded(input_path: str, result) -> None:  # noqa: ANN001 - a FoldResult (torch-free module)
    """A model with BatchNorms of which none folded would otherwise exit 0 in silence."""
    if result.skipped and not result.folded:
        warn(f"{input_path}: none of its {len(result.skipped)} BatchNorm(s) could be folded; the reasons are listed "
             "(use --strict to make this an error)")


def _print_arch(input_path: str, output_path: str, arch: str, report) -> None:  # noqa: ANN001 - a FuseReport
    result, check = report.result, report.self_check
    into = {"producer": "layer before (weight, bias)", "consumer": "layer after (weight, bias)"}
    console = stdout_console()
    console.print(make_table(
        f"Folded {input_path} -> {output_path} ({arch}, {result.form}, {report.dtype}, traced with {result.tracer})",
        ["layer", "BatchNorm", "folded into"],
        [[layer, bn, into[result.into[bn]] + (", gained bias" if layer in result.gained_bias else "")]
         for layer, bn in result.folded], markup=False))
    if result.merged or result.merge_refused:
        console.print(make_table(f"Merged branches ({len(result.merged)})", ["conv", "kernel", "branches"],
                                 [[m.conv, "x".join(map(str, m.kernel_size)), " + ".join(m.branches)]
                                  for m in result.merged]
                                 + [[where, "not merged", reason] for where, reason in result.merge_refused],
                                 markup=False))
    if result.skipped:
        console.print(make_table(f"Not folded ({len(result.skipped)})", ["BatchNorm", "reason"],
                                 [[bn, reason] for bn, reason in result.skipped], markup=False))
    console.print(plain(f"self-check: max |diff| {fmt(check.max_abs_diff)} vs output scale {fmt(check.output_scale)} on "
                        f"{check.samples} random inputs of shape {tuple(report.input_shape)} (tolerance "
                        f"{fmt(check.tolerance)}); manifest {report.manifest}; {report.seconds:.2f} s"))
