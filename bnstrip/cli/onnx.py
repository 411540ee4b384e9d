"""The ONNX jobs of `bnstrip fuse` and `bnstrip verify` (issue 20); onnx, onnxruntime and torch are imported inside."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bnstrip.cli.common import (
    core_json,
    emit_json,
    fmt,
    make_table,
    plain,
    stdout_console,
    strict_gate,
    warn,
)

MISSING_EXTRA = "ONNX support needs the onnx extra: pip install 'bnstrip[onnx]'"


def _require_onnx() -> None:
    from bnstrip.errors import InputError

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise InputError(MISSING_EXTRA) from None


def is_onnx_job(input_path: str, output_path: str) -> bool:
    """IN is an ONNX model (by its bytes) or OUT is named *.onnx."""
    from bnstrip.io.sniff import is_onnx_file

    return Path(output_path).suffix.lower() == ".onnx" or is_onnx_file(input_path)


def fuse_onnx_job(input_path: str, output_path: str, *, arch: str | None, input_shape: str | None, eps: float | None,
                  keep_structure: bool, reparameterize: bool, dtype: str, force: bool, allow_overflow: bool,
                  as_json: bool, strict: bool, arch_kwargs: str | None = None, dry_run: bool = False) -> bool:
    """Run `bnstrip fuse` for ONNX (IN.onnx -> OUT.onnx, or --arch IN -> OUT.onnx); False when it is not such a job."""
    if not is_onnx_job(input_path, output_path):
        return False
    from bnstrip.io.sniff import is_onnx_file

    if arch is None and not is_onnx_file(input_path) and Path(input_path).suffix.lower() != ".onnx":
        from bnstrip.errors import InputError
        from bnstrip.io.write import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES

        names = ", ".join(s for s in TORCH_SUFFIXES + SAFETENSORS_SUFFIXES if s)
        raise InputError(f"{output_path}: an .onnx OUT needs an ONNX model as IN, or --arch to export the folded "
                         f"checkpoint; for a checkpoint OUT use one of {names}")
    if dry_run:
        raise click.UsageError("--dry-run is not available for ONNX yet: fuse to a scratch OUT.onnx instead")
    _require_onnx()
    if arch is not None:
        from bnstrip.onnxfold.export import fuse_arch_to_onnx

        from bnstrip.cli.common import arch_input_shape

        report = fuse_arch_to_onnx(input_path, output_path, arch, arch_input_shape(arch, input_shape), eps=eps, force=force,
                                   allow_overflow=allow_overflow, dtype=dtype, arch_kwargs=arch_kwargs)
    else:
        if input_shape or keep_structure or reparameterize or eps is not None or dtype != "keep":
            raise click.UsageError("IN is an ONNX model: its own eps, dtype and input shapes are used (no --eps, "
                                   "--dtype, --input-shape, --keep-structure or --reparameterize)")
        from bnstrip.onnxfold.save import fuse_onnx_file

        report = fuse_onnx_file(input_path, output_path, force=force, allow_overflow=allow_overflow)
    _report(report, as_json, strict)
    return True


def _report(report: Any, as_json: bool, strict: bool) -> None:
    result = report.result
    for note in report.warnings:
        warn(note)
    failed = strict and bool(result.skipped)
    if as_json:
        emit_json({**core_json("fuse", not failed, report.seconds), **report.to_dict()})
    else:
        _print(report)
    strict_gate(report.input, report.output, result.skipped, strict)


def _print(report: Any) -> None:
    result, check = report.result, report.self_check
    into = {"producer": "layer before (weight, bias)", "consumer": "layer after (weight, bias)"}
    console = stdout_console()
    console.print(make_table(f"Folded {report.input} -> {report.output} (onnx)", ["layer", "BatchNorm", "folded into"],
                             [[layer, bn, into[result.into[bn]] + (", gained bias" if layer in result.gained_bias
                                                                   else "")]
                              for layer, bn in result.folded], markup=False))
    if result.skipped:
        console.print(make_table(f"Not folded ({len(result.skipped)})", ["BatchNorm", "reason"],
                                 [[bn, reason] for bn, reason in result.skipped], markup=False))
    data = f"; external data {report.data_file}" if getattr(report, "data_file", None) else ""
    figures = (f"max |diff| {fmt(check.max_abs_diff)} vs output scale {fmt(check.output_scale)} on {check.samples} "
               f"random inputs (tolerance {fmt(check.tolerance)})" if check.samples else
               "nothing folded, nothing to check")
    console.print(plain(f"self-check: {figures}; manifest {report.manifest}{data}; {report.seconds:.2f} s"))


def verify_onnx(first: str, second: str, inputs_file: str | None, as_json: bool) -> None:
    """`bnstrip verify A.onnx B.onnx`: B against a float64 evaluation of A, on seeded inputs or --inputs."""
    _require_onnx()
    from bnstrip.errors import CheckFailed
    from bnstrip.onnxfold.verify import verify_models

    result = verify_models(first, second, inputs_file)
    check = result.check
    if as_json:
        emit_json({**core_json("verify", check.passed, result.seconds), "first": first, "second": second,
                   "inputs": inputs_file, "max_abs_diff": check.max_abs_diff, "output_scale": check.output_scale,
                   "rounding": check.rounding, "tolerance": check.tolerance, "samples": check.samples})
    else:
        rows = [["max |B - A in float64|", fmt(check.max_abs_diff), f"<= {fmt(check.tolerance)}"],
                ["A's own rounding", fmt(check.rounding) if check.rounding is not None else "n/a", ""],
                ["output scale", fmt(check.output_scale), ""],
                ["input sets", str(check.samples), ""], ["verify time", f"{result.seconds:.2f} s", ""]]
        console = stdout_console()
        console.print(plain(f"verify {first} vs {second} on {inputs_file or 'seeded random inputs'}"))
        console.print(make_table("", ["figure", "value", "bar"], rows))
        console.print("[bold green]PASS[/]" if check.passed else "[bold red]FAIL[/]")
    if not check.passed:
        raise CheckFailed(f"{second}: {check.describe()}")
