"""The exported-program (.pt2) jobs of `bnstrip fuse` and `bnstrip verify` (issue 13); torch is imported inside."""
from __future__ import annotations

from typing import Any

from bnstrip.cli.common import core_json, emit_json, fmt, make_table, stdout_console, warn


def _is_program(path: str) -> bool:
    from bnstrip.io.pt2 import is_pt2

    return is_pt2(path)


def fuse_program_job(input_path: str, output_path: str, *, arch: str | None, input_shape: str | None,
                     keep_structure: bool, reparameterize: bool, eps: float | None, force: bool,
                     allow_overflow: bool, dtype: str, as_json: bool, arch_kwargs: str | None = None,
                     dry_run: bool = False, dynamic_batch: bool = True, strict: bool = False) -> bool:
    """Run `bnstrip fuse` when IN is a program (by content) or OUT ends in .pt2; False when it is not such a job."""
    import click

    from bnstrip.errors import InputError, printable
    from bnstrip.pipeline_program import fuse_arch_to_program, fuse_program_file, is_program_path

    program_in = arch is None and (_is_program(input_path) or is_program_path(output_path))
    if not program_in and not is_program_path(output_path):
        return False  # without --arch a .pt2 OUT needs a program IN: load_program says why IN is not one
    if keep_structure or reparameterize:
        raise click.UsageError("--keep-structure and --reparameterize do not apply to an exported program (.pt2)")
    if program_in:
        if input_shape or dtype != "keep":
            raise click.UsageError("IN is an exported program: its own example inputs and dtype are used "
                                   "(no --input-shape, no --dtype)")
        if not is_program_path(output_path) and not dry_run:
            raise InputError(f"{output_path}: IN is an exported program, so OUT is one too; name it *.pt2")
        report = fuse_program_file(input_path, output_path, eps=eps, allow_overflow=allow_overflow, force=force,
                                   dry_run=dry_run)
    else:
        from bnstrip.cli.common import arch_input_shape, arch_model_factory
        from bnstrip.core.compare import seeded_inputs

        shape = arch_input_shape(arch, input_shape)
        factory = arch_model_factory(arch, arch_kwargs)
        report = fuse_arch_to_program(input_path, output_path, factory, (seeded_inputs(shape, seed=0),), arch=arch,
                                      eps=eps, allow_overflow=allow_overflow, force=force, dtype=dtype,
                                      dynamic_batch=dynamic_batch, dry_run=dry_run)
        click.echo(f"bnstrip: {printable(output_path)}: " + (f"dynamic batch dimension (any N >= 1; exported from N={report.input_shape[0]})"
                                   if report.dynamic_dims else
                                   f"static batch: the program takes N={report.input_shape[0]} only"
                                   + ("" if dynamic_batch else " (--static-batch)")), err=True)
    _print_fuse(report, as_json, strict, dry_run)
    from bnstrip.cli.common import strict_gate

    strict_gate(input_path, output_path, report.result.skipped, strict, dry_run)
    return True


def _print_fuse(report: Any, as_json: bool, strict: bool = False, dry_run: bool = False) -> None:
    for note in report.result.warnings:
        warn(f"{report.input}: {note}")
    if as_json:
        emit_json({**core_json("fuse", not (strict and report.result.skipped), report.seconds), **report.to_dict(),
                   "dry_run": dry_run, **({"output": None} if dry_run else {})})
        return
    result, check = report.result, report.self_check
    console = stdout_console()
    dynamic = f", dynamic dims {', '.join(report.dynamic_dims)}" if report.dynamic_dims else ""
    done = f"Would fold {report.input} (dry run, nothing written)" if dry_run else f"Folded {report.input} -> {report.output}"
    console.print(make_table(f"{done} (exported program{dynamic})",
                             ["layer", "BatchNorm", "folded into"],
                             [[layer, bn, ("layer before" if result.into.get(bn, "producer") == "producer"
                                           else "layer after") + (", gained bias" if layer in result.gained_bias
                                                                  else "")]
                              for layer, bn in result.folded], markup=False))
    if result.skipped:
        console.print(make_table(f"Not folded ({len(result.skipped)})", ["BatchNorm", "reason"],
                                 [[bn, reason] for bn, reason in result.skipped], markup=False))
    console.print(f"self-check: max |diff| {fmt(check.max_abs_diff)} vs output scale {fmt(check.output_scale)} "
                  f"(tolerance {fmt(check.tolerance)}); {report.seconds:.2f} s")


def _load_inputs(path: str) -> Any:
    """A tensor or tuple of tensors (.pt, loaded weights_only after the checkpoint checks) or a .safetensors file
    (its tensors in key order)."""
    import os
    from pathlib import Path

    import torch

    from bnstrip.errors import InputError
    from bnstrip.io.checkpoint import validate_pickled
    from bnstrip.io.sniff import detect, open_regular_file

    with open_regular_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        fmt_name = detect(f, size, Path(path))
        if fmt_name == "safetensors":  # the checkpoints' validator: bounded header and count, no overlaps
            from bnstrip.io.safetensors_check import read_tensors, validate_safetensors

            tensors = read_tensors(f, validate_safetensors(f, size, Path(path)), Path(path))
            return tuple(tensors[k] for k in sorted(tensors))
        validate_pickled(f, fmt_name, size, Path(path))
        f.seek(0)
        value = torch.load(f, weights_only=True, map_location="cpu")
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in value):
        return tuple(value)
    raise InputError(f"{path}: --inputs must hold a tensor or a tuple of tensors, not {type(value).__name__}")


def verify_programs(reference: str, candidate: str, inputs_file: str | None, as_json: bool) -> None:
    """`bnstrip verify A.pt2 B.pt2 [--inputs FILE]`: the comparator's rule decides; exit 1 when it fails."""
    import time

    from bnstrip.errors import CheckFailed
    from bnstrip.fold.program import compare_programs
    from bnstrip.io.pt2 import load_program

    started = time.perf_counter()
    inputs = _load_inputs(inputs_file) if inputs_file else None  # first: the cheap file is refused before any program
    a, b = load_program(reference), load_program(candidate)
    check = compare_programs(a, b, inputs, name=f"{reference} vs {candidate}")
    seconds = time.perf_counter() - started
    if as_json:
        emit_json({**core_json("verify", check.passed, seconds), "checkpoint": reference, "fused": candidate,
                   "inputs": inputs_file or "program example inputs", "max_abs_diff": check.max_abs_diff,
                   "output_scale": check.output_scale, "rounding": check.rounding, "tolerance": check.tolerance,
                   "passed": check.passed})
    else:
        console = stdout_console()
        console.print(make_table(f"verify {reference} vs {candidate} on {inputs_file or 'the example inputs'}",
                                 ["figure", "value"],
                                 [["max |diff| vs float64 original" if check.rounding is not None else "max |diff|",
                                   fmt(check.max_abs_diff)], ["original's own rounding",
                                                              "-" if check.rounding is None else fmt(check.rounding)],
                                  ["tolerance", fmt(check.tolerance)], ["verify time", f"{seconds:.2f} s"]],
                                 markup=False))
        console.print("PASS" if check.passed else "FAIL")
    if not check.passed:
        raise CheckFailed(f"{candidate}: {check.describe()}")
