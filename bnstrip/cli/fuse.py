"""`bnstrip fuse`: fold a checkpoint's BatchNorms and write the folded state_dict (smallNet or any --arch model).

Only click is imported at module level; the library is imported inside the command.
"""
from __future__ import annotations


import click

from bnstrip.cli.common import (arch_input_shape, arch_model_factory, core_json, emit_json, fmt, handle_errors, make_table,
                                plain, stdout_console, strict_gate, warn)
from bnstrip.cli.types import EPS


@click.command()
@click.argument("input_path", metavar="IN", type=click.Path(dir_okay=True, path_type=str))
@click.argument("output_path", metavar="OUT", required=False, type=click.Path(path_type=str))
@click.option("--eps", type=EPS, default=None, help="BatchNorm eps (not stored in a state_dict). Default: the model's own (1e-5 for smallNet).")
@click.option("--arch", default=None, metavar="SOURCE", help="Build this model instead of smallNet: MODULE:CALLABLE (a class or factory), torchvision:NAME, timm:NAME or ultralytics:CONFIG.yaml (no weights downloaded); IN must load into it strictly. Runs that code, by design.")
@click.option("--arch-kwargs", default=None, metavar="JSON", help="Keyword arguments for the --arch class or factory, a JSON object, e.g. '{\"num_classes\": 10}'.")
@click.option("--input-shape", default=None, metavar="N,C,H,W", help="Shape of the random inputs for tracing and the self-check (with --arch), batch dimension first.")
@click.option("--keep-structure", is_flag=True, help="With --arch: keep every module (folded BNs become exact identity-plus-bias), so OUT loads into the original class; no speed-up.")
@click.option("--reparameterize", is_flag=True, help="With --arch: also merge sums of parallel branches (RepVGG, MobileOne, ACNet blocks) into one conv each, proven like the folds; not with --keep-structure.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (never the input).")
@click.option("--allow-overflow", is_flag=True, help="Write even if a folded half-precision value overflows (warns instead of refusing).")
@click.option("--dtype", type=click.Choice(["keep", "float32", "float64"]), default="keep", show_default=True, help="Convert IN to this dtype before folding; OUT is written in it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--strict", is_flag=True, help="Exit 1 if any BatchNorm was not folded (OUT is still written): a CI gate.")
@click.option("--dry-run", is_flag=True, help="Fold and self-check as usual and report what would fold, but write nothing (OUT may be left out).")
@click.option("--dynamic-batch/--static-batch", default=True, help="With --arch and OUT.pt2: export the batch dimension as dynamic (default) or fixed at --input-shape's N.")
@handle_errors
def fuse(input_path: str, output_path: str | None, eps: float | None, arch: str | None, arch_kwargs: str | None,
         input_shape: str | None, keep_structure: bool, reparameterize: bool, force: bool, allow_overflow: bool,
         dtype: str, as_json: bool, strict: bool = False, dry_run: bool = False, dynamic_batch: bool = True) -> None:
    """Fold every BatchNorm of the checkpoint IN and write the folded state_dict to OUT (.pt or .safetensors).

    Without --arch, IN is a smallNetTrain checkpoint and OUT a smallNetTest state_dict.
    An ONNX model IN folds into OUT.onnx; with --arch, OUT.onnx is the folded model exported.
    The folded model is checked against the original on random inputs before anything is written.
    """
    from bnstrip.cli.onnx import fuse_onnx_job  # issue 20: IN.onnx (by content) or OUT.onnx
    from bnstrip.cli.program import fuse_program_job  # issue 13: IN.pt2 (by content) or OUT.pt2

    if output_path is None and not dry_run:
        raise click.UsageError("Missing argument 'OUT' (only --dry-run goes without it).")
    if arch_kwargs is not None and arch is None:
        raise click.UsageError("--arch-kwargs goes with --arch")
    output_path = output_path if output_path is not None else "(dry run)"
    if fuse_onnx_job(input_path, output_path, arch=arch, input_shape=input_shape, eps=eps,
                     keep_structure=keep_structure, reparameterize=reparameterize, dtype=dtype, force=force,
                     allow_overflow=allow_overflow, as_json=as_json, strict=strict, arch_kwargs=arch_kwargs,
                     dry_run=dry_run):
        return

    if fuse_program_job(input_path, output_path, arch=arch, input_shape=input_shape, keep_structure=keep_structure,
                        reparameterize=reparameterize, eps=eps, force=force, allow_overflow=allow_overflow,
                        dtype=dtype, as_json=as_json, arch_kwargs=arch_kwargs, dry_run=dry_run,
                        dynamic_batch=dynamic_batch, strict=strict):
        return
    if arch is not None:
        _fuse_arch(input_path, output_path, arch, input_shape, keep_structure, eps, force, allow_overflow, dtype,
                   as_json, reparameterize, strict, arch_kwargs=arch_kwargs, dry_run=dry_run)
        return
    if keep_structure or input_shape or reparameterize:
        raise click.UsageError("--keep-structure, --reparameterize and --input-shape go with --arch")
    _fuse_smallnet(input_path, output_path, eps, force, allow_overflow, dtype, as_json, strict, dry_run)


def _fuse_smallnet(input_path: str, output_path: str, eps: float | None, force: bool, allow_overflow: bool,
                   dtype: str, as_json: bool, strict: bool = False, dry_run: bool = False) -> None:
    from bnstrip.homework.models import SmallNetTrain
    from bnstrip.pipeline import fuse_file

    result = fuse_file(input_path, output_path, SmallNetTrain, eps=eps, force=force, allow_overflow=allow_overflow,
                       dtype=dtype, dry_run=dry_run)
    for note in result.unwrapped + result.warnings:  # after the write, so a failure stays a single stderr line
        warn(f"{input_path}: {note}")
    skipped = result.result.skipped if result.result is not None else []  # smallNet: every pair folds, or it raises
    if as_json:
        emit_json({**core_json("fuse", not (strict and skipped), result.seconds), **result.to_dict(),
                   "dry_run": dry_run, **({"output": None} if dry_run else {})})
    else:
        _print_smallnet(input_path, output_path, result, dry_run)
    strict_gate(input_path, output_path, skipped, strict, dry_run)


def _print_smallnet(input_path: str, output_path: str, result, dry_run: bool = False) -> None:  # noqa: ANN001
    console = stdout_console()
    done = f"would fold {input_path} (dry run, nothing written)" if dry_run else f"folded {input_path} -> {output_path}"
    console.print(plain(f"{done} (smallNetTest state_dict, {result.dtype})"))
    console.print(make_table("", ["producer", "BatchNorm", "folded into"],
                             [[p, b, "weight, bias"] for p, b in result.pairs], markup=False))
    console.print(f"self-check: max |diff| {fmt(result.self_check.max_abs_diff)} on {result.self_check.samples} random "
                  f"inputs (tolerance {fmt(result.self_check.tolerance)}), {result.seconds:.2f} s")


def _fuse_arch(input_path: str, output_path: str, arch: str, input_shape: str | None, keep_structure: bool,
               eps: float | None, force: bool, allow_overflow: bool, dtype: str, as_json: bool,
               reparameterize: bool = False, strict: bool = False, *, arch_kwargs: str | None = None,
               dry_run: bool = False) -> None:
    from bnstrip.core.compare import seeded_inputs
    from bnstrip.pipeline import fuse_file

    shape = arch_input_shape(arch, input_shape)
    factory = arch_model_factory(arch, arch_kwargs)  # a wrong --arch is named before IN is read
    report = fuse_file(input_path, output_path, factory, seeded_inputs(shape, seed=0),
                       eps=eps, keep_structure=keep_structure, allow_overflow=allow_overflow, force=force, dtype=dtype,
                       arch=arch, reparameterize=reparameterize, dry_run=dry_run)
    for note in report.unwrapped:
        warn(f"{input_path}: {note}")
    for note in report.warnings:
        warn(f"{input_path}: {note}")
    if as_json:
        emit_json({**core_json("fuse", not (strict and report.result.skipped), report.seconds), **report.to_dict(),
                   "dry_run": dry_run, **({"output": None} if dry_run else {})})
    else:
        _print_arch(input_path, output_path, arch, report, dry_run)
    strict_gate(input_path, output_path, report.result.skipped, strict, dry_run)


def _print_arch(input_path: str, output_path: str, arch: str, report,  # noqa: ANN001 - a FuseReport
                dry_run: bool = False) -> None:
    result, check = report.result, report.self_check
    into = {"producer": "layer before (weight, bias)", "consumer": "layer after (weight, bias)"}
    console = stdout_console()
    done = f"Would fold {input_path} (dry run, nothing written)" if dry_run else f"Folded {input_path} -> {output_path}"
    console.print(make_table(
        f"{done} ({arch}, {result.form}, {report.dtype}, traced with {result.tracer})",
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
                        f"{fmt(check.tolerance)}); manifest {report.manifest or 'none (dry run)'}; {report.seconds:.2f} s"))
