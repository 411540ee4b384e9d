"""The `bnstrip` command: parses options, calls the library, prints results.

No torch import at module level: `bnstrip --help` must stay fast.
"""
from __future__ import annotations

import time

import click

from bnstrip import __version__
from bnstrip.cli.common import (
    DEFAULT_CHECKPOINT,
    EXIT_CHECK_FAILED,
    Progress,
    emit_json,
    fmt,
    handle_errors,
    make_table,
    stdout_console,
    warn,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="bnstrip")
def main() -> None:
    """Fold BatchNorm into the neighbouring conv/linear layers, prove the outputs match, write the checkpoint.

    \b
    bnstrip fuse smallNetSaved smallNetTest.pt     # fold, self-check, write
    bnstrip verify --fused smallNetTest.pt         # prove it on CIFAR-10's test set
    """


# --------------------------------------------------------------------------- fuse


@main.command()
@click.argument("input_path", metavar="IN", type=click.Path(dir_okay=True, path_type=str))
@click.argument("output_path", metavar="OUT", type=click.Path(path_type=str))
@click.option("--eps", type=float, default=None, help="BatchNorm eps (not stored in a state_dict). Default: the model's own (1e-5 for smallNet).")
@click.option("--arch", default=None, metavar="MODULE:CALLABLE", help="Build this model (a class or factory) instead of smallNet; IN must load into it strictly.")
@click.option("--input-shape", default=None, metavar="N,C,H,W", help="Shape of the random inputs for tracing and the self-check (with --arch).")
@click.option("--keep-structure", is_flag=True, help="With --arch: keep every module; folded BNs become exact identity-plus-bias.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (never the input).")
@click.option("--allow-overflow", is_flag=True, help="Write even if a folded half-precision value overflows (warns instead of refusing).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@handle_errors
def fuse(input_path: str, output_path: str, eps: float | None, arch: str | None, input_shape: str | None,
         keep_structure: bool, force: bool, allow_overflow: bool, as_json: bool) -> None:
    """Fold every BatchNorm of the checkpoint IN and write the folded state_dict to OUT (.pt or .safetensors).

    Without --arch, IN is a smallNetTrain checkpoint and OUT a smallNetTest state_dict.
    The folded model is checked against the original on random inputs before anything is written.
    """
    if arch is not None:
        _fuse_arch(input_path, output_path, arch, input_shape, keep_structure, eps, force, allow_overflow, as_json)
        return
    if keep_structure or input_shape:
        raise click.UsageError("--keep-structure and --input-shape go with --arch")
    _fuse_smallnet(input_path, output_path, eps, force, allow_overflow, as_json)


def _fuse_smallnet(input_path: str, output_path: str, eps: float | None, force: bool, allow_overflow: bool,
                   as_json: bool) -> None:
    from bnstrip import __version__ as version
    from bnstrip.io.checkpoint import check_output_path, load_checkpoint, save_checkpoint
    from bnstrip.homework.models import SMALLNET_EPS
    from bnstrip.homework.smallnet import fuse_smallnet

    started = time.perf_counter()
    check_output_path(output_path, [input_path], force)
    loaded = load_checkpoint(input_path)
    eps_value = SMALLNET_EPS if eps is None else eps
    result = fuse_smallnet(loaded.state_dict, eps=eps_value, source=input_path, allow_overflow=allow_overflow)
    pairs_text = ",".join(f"{p}+{b}" for p, b in result.pairs)
    save_checkpoint(result.state_dict, output_path, force=force, inputs=[input_path], metadata={
        "source_sha256": loaded.sha256, "bnstrip_version": version, "folded_pairs": pairs_text, "eps": repr(eps_value),
        "architecture": "smallNetTest",
    })
    for note in loaded.unwrapped + result.warnings:  # after the write, so a failure stays a single stderr line
        warn(f"{input_path}: {note}")
    seconds = time.perf_counter() - started
    if as_json:
        emit_json({
            "input": input_path, "output": output_path, "format": loaded.format, "eps": eps_value,
            "pairs": [{"producer": p, "bn": b} for p, b in result.pairs],
            "self_check_max_abs_diff": result.self_check.max_abs_diff,
            "self_check_tolerance": result.self_check.tolerance,
            "unwrapped": loaded.unwrapped, "warnings": result.warnings, "seconds": seconds,
        })
        return
    console = stdout_console()
    console.print(f"folded {input_path} -> {output_path} (smallNetTest state_dict)")
    console.print(make_table("", ["producer", "BatchNorm", "folded into"],
                             [[p, b, "weight, bias"] for p, b in result.pairs]))
    console.print(f"self-check: max |diff| {fmt(result.self_check.max_abs_diff)} on {result.self_check.samples} random "
                  f"inputs (tolerance {fmt(result.self_check.tolerance)}), {seconds:.2f} s")


def _fuse_arch(input_path: str, output_path: str, arch: str, input_shape: str | None, keep_structure: bool,
               eps: float | None, force: bool, allow_overflow: bool, as_json: bool) -> None:
    from bnstrip.cli.common import parse_int_list
    from bnstrip.engine import fuse_checkpoint

    shape = parse_int_list(input_shape, "--input-shape") if input_shape is not None else None
    report = fuse_checkpoint(input_path, output_path, arch, shape, keep_structure=keep_structure, eps=eps, force=force,
                             allow_overflow=allow_overflow)
    for note in report.unwrapped:
        warn(f"{input_path}: {note}")
    for note in report.warnings:
        warn(note)
    if as_json:
        emit_json(report.to_dict())
        return
    result, check = report.result, report.self_check
    into = {"producer": "layer before (weight, bias)", "consumer": "layer after (weight, bias)"}
    console = stdout_console()
    console.print(make_table(
        f"Folded {input_path} -> {output_path} ({arch}, {result.form}, traced with {result.tracer})",
        ["layer", "BatchNorm", "folded into"],
        [[layer, bn, into[result.into[bn]] + (", gained bias" if layer in result.gained_bias else "")]
         for layer, bn in result.folded]))
    if result.skipped:
        console.print(make_table(f"Not folded ({len(result.skipped)})", ["BatchNorm", "reason"],
                                 [[bn, reason] for bn, reason in result.skipped]))
    console.print(f"self-check: max |diff| {fmt(check.max_abs_diff)} vs output scale {fmt(check.output_scale)} on "
                  f"{check.samples} random inputs of shape {tuple(report.input_shape)} (tolerance {fmt(check.tolerance)}); "
                  f"manifest {report.manifest}; {report.seconds:.2f} s")


# --------------------------------------------------------------------------- verify


@main.command()
@click.option("--checkpoint", default=DEFAULT_CHECKPOINT, show_default=True, type=click.Path(path_type=str), help="The smallNetTrain checkpoint (with BatchNorm).")
@click.option("--fused", default=None, type=click.Path(path_type=str), help="A smallNetTest checkpoint written by `bnstrip fuse`; default: fold in memory.")
@click.option("--data-dir", default=None, type=click.Path(path_type=str), help="Folder holding cifar-10-batches-py/ (else $BNSTRIP_DATA_DIR, ~/.cache/bnstrip, ./data, then download).")
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(min=1), help="Batch size of the course's figure.")
@click.option("--tolerance", default=1e-8, show_default=True, type=float, help="Pass if max over batches of ||diff||^2 is below this.")
@click.option("--eps", type=float, default=None, help="BatchNorm eps of the checkpoint (default 1e-5).")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Use only the first N test images.")
@click.option("--no-download", is_flag=True, help="Fail instead of downloading CIFAR-10 when no local copy is found.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@handle_errors
def verify(checkpoint: str, fused: str | None, data_dir: str | None, batch_size: int, tolerance: float,
           eps: float | None, limit: int | None, no_download: bool, as_json: bool) -> None:
    """Run the BN model and the folded model over CIFAR-10's test set and compare their outputs.

    Exit 0 when max over batches of the squared norm of the output difference is below
    --tolerance, 1 when it is not, 2 on bad input.
    """
    import sys

    from bnstrip.homework.data import load_split
    from bnstrip.homework.models import SMALLNET_EPS
    from bnstrip.homework.smallnet import load_smallnet_pair
    from bnstrip.homework.verify import verify_models

    bn_model, folded_model, notes = load_smallnet_pair(checkpoint, fused, SMALLNET_EPS if eps is None else eps)
    for note in notes:
        warn(note)
    with Progress("downloading CIFAR-10", enabled=not as_json or sys.stderr.isatty()) as download_progress:
        split = load_split("test", data_dir, allow_download=not no_download, progress=download_progress)
    images, labels = split.images, split.labels
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    with Progress("verifying") as progress:
        result = verify_models(bn_model, folded_model, images, labels, batch_size=batch_size, tolerance=tolerance,
                               progress=progress)
    if as_json:
        emit_json({**result.to_dict(), "checkpoint": checkpoint, "fused": fused, "data": str(split.source)})
    else:
        rows = [
            ["max over batches of ||diff||^2", fmt(result.max_batch_sq_norm), f"< {fmt(tolerance)}"],
            ["max |diff|", fmt(result.max_abs_diff), ""],
            ["predicted class agrees", f"{result.agreement:.2%}", ""],
            ["accuracy, BN model", f"{result.accuracy_bn:.2%}", ""],
            ["accuracy, folded model", f"{result.accuracy_folded:.2%}", ""],
            ["images (batch size)", f"{result.images} ({result.batch_size})", ""],
            ["verify time", f"{result.seconds:.2f} s", ""],
        ]
        title = f"verify {checkpoint} vs {fused or 'folded in memory'} on {split.source}"
        console = stdout_console()
        console.print(title)
        console.print(make_table("", ["figure", "value", "bar"], rows))
        console.print("[bold green]PASS[/]" if result.passed else "[bold red]FAIL[/]")
    if not result.passed:
        raise SystemExit(EXIT_CHECK_FAILED)


# --------------------------------------------------------------------------- other command groups
# Each lives in its own module (click only at import time) and registers its commands here.

from bnstrip.cli import bench as cli_bench, maths as cli_maths  # noqa: E402

cli_maths.register(main)
cli_bench.register(main)
