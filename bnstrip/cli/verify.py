"""`bnstrip verify`: the course's check (homework 6, Problem 1) on CIFAR-10's test set.

Only click is imported at module level; torch and the homework package are imported inside the command.
"""
from __future__ import annotations

import sys

import click

from bnstrip.cli.common import (DEFAULT_CHECKPOINT, Progress, core_json, emit_json, fmt, handle_errors, make_table,
                                plain, stdout_console, warn)
from bnstrip.cli.types import EPS, THREADS, BoundedFloat, BoundedInt
from bnstrip.errors import CheckFailed, InputError


def _files(positional: tuple[str, ...], checkpoint: str | None, fused: str | None) -> tuple[str, str | None]:
    """CHECKPOINT [FUSED] as positionals, or --checkpoint/--fused; both ways for the same file is flag misuse."""
    if len(positional) > 2:
        raise click.UsageError(f"at most two files (CHECKPOINT FUSED), got {len(positional)}")
    if positional and checkpoint is not None:
        raise click.UsageError("give the BN checkpoint either as the first argument or as --checkpoint, not both")
    if len(positional) == 2 and fused is not None:
        raise click.UsageError("give the folded file either as the second argument or as --fused, not both")
    first = positional[0] if positional else checkpoint or DEFAULT_CHECKPOINT
    second = positional[1] if len(positional) == 2 else fused
    return first, second


def _exists(*paths: str | None) -> None:
    """A missing CHECKPOINT or FUSED is named before the data is looked for (or downloaded)."""
    from bnstrip.io.sniff import open_regular_file

    for path in paths:
        if path is not None:
            with open_regular_file(path):
                pass


def _is_bn_checkpoint(path: str) -> bool:
    """Whether `path` holds a smallNetTrain state_dict (BatchNorm statistics), i.e. the file for --checkpoint."""
    from bnstrip.io.checkpoint import load_checkpoint

    try:
        return any(key.endswith("running_var") for key in load_checkpoint(path).state_dict)
    except Exception:  # noqa: BLE001 - only a hint for a message that is already an error
        return False


def _is_folded_smallnet(path: str) -> bool:
    """Whether `path` holds exactly smallNetTest's keys (a file written by `bnstrip fuse`), i.e. the file for --fused."""
    import torch

    from bnstrip.homework.models import SmallNetTest
    from bnstrip.io.checkpoint import load_checkpoint

    try:
        with torch.device("meta"):
            expected = set(SmallNetTest().state_dict())
        return set(load_checkpoint(path).state_dict) == expected
    except Exception:  # noqa: BLE001 - only a hint for a message that is already an error
        return False


def _fused_dtypes(path: str | None) -> set[str]:
    """The floating dtypes stored in the folded file (float32 when folded in memory)."""
    if path is None:
        return {"float32"}
    from bnstrip.io.checkpoint import load_checkpoint

    return {str(t.dtype).replace("torch.", "") for t in load_checkpoint(path).state_dict.values()
            if t.dtype.is_floating_point}


@click.command()
@click.argument("files", nargs=-1, metavar="[CHECKPOINT [FUSED]]", type=click.Path(path_type=str))
@click.option("--checkpoint", default=None, type=click.Path(path_type=str), help=f"The smallNetTrain checkpoint (with BatchNorm); default {DEFAULT_CHECKPOINT}. Same as the first argument.")
@click.option("--fused", default=None, type=click.Path(path_type=str), help="A smallNetTest checkpoint written by `bnstrip fuse`; default: fold in memory. Same as the second argument.")
@click.option("--data-dir", default=None, type=click.Path(path_type=str), help="Folder holding cifar-10-batches-py/; an error if it lacks it. Without it: $BNSTRIP_DATA_DIR, ~/.cache/bnstrip, ./data, then a download (about 163 MB).")
@click.option("--batch-size", default=100, show_default=True, type=BoundedInt(1, 10_000), help="Batch size of the course's figure.")
@click.option("--tolerance", default=1e-8, show_default=True, type=BoundedFloat(0, None, low_open=True), help="Pass if max over batches of ||diff||^2 is below this.")
@click.option("--eps", type=EPS, default=None, help="BatchNorm eps of the checkpoint (default 1e-5).")
@click.option("--limit", default=None, type=BoundedInt(1, 10**9), help="Use only the first N test images.")
@click.option("--threads", default=None, type=THREADS, help="Workers for the comparison, each on one torch thread (default: one per core); the figures are the same at any count.")
@click.option("--no-download", is_flag=True, help="Fail instead of downloading CIFAR-10 when no local copy is found.")
@click.option("--inputs", "inputs_file", default=None, type=click.Path(path_type=str), help="With two exported programs (.pt2): run both on these inputs (a .pt tensor/tuple or a .safetensors file) instead of the program's example inputs. With two ONNX models: an .npz or .safetensors file of arrays named after the graph inputs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@handle_errors
def verify(files: tuple[str, ...], checkpoint: str | None, fused: str | None, data_dir: str | None, batch_size: int,
           tolerance: float, eps: float | None, limit: int | None, threads: int | None, no_download: bool,
           inputs_file: str | None, as_json: bool) -> None:
    """Run the BN model and the folded model over CIFAR-10's test set and compare their outputs.

    \b
    bnstrip verify smallNetSaved smallNetTest.pt     # CHECKPOINT FUSED
    bnstrip verify                                   # smallNetSaved, folded in memory

    Exit 0 when max over batches of the squared norm of the output difference is below
    --tolerance, 1 when it is not, 2 on bad input.
    """
    from bnstrip.homework.data import load_split

    checkpoint, fused = _files(files, checkpoint, fused)
    if _verified_other_format(checkpoint, fused, inputs_file, as_json):
        return
    if inputs_file is not None:
        raise click.UsageError("--inputs goes with two exported programs (.pt2) or two ONNX models")
    _exists(checkpoint, fused)
    with Progress("downloading CIFAR-10 (about 163 MB)", enabled=not as_json or sys.stderr.isatty()) as download:
        split = load_split("test", data_dir, allow_download=not no_download, progress=download)  # before torch
    from bnstrip.homework.models import SMALLNET_EPS
    from bnstrip.homework.smallnet import load_smallnet_pair
    from bnstrip.homework.verify import DEFAULT_THREADS, verify_models

    try:
        bn_model, folded_model, notes = load_smallnet_pair(checkpoint, fused, SMALLNET_EPS if eps is None else eps)
    except InputError as exc:
        if fused is not None and _is_bn_checkpoint(fused):
            raise InputError(f"{fused}: not a smallNetTest state_dict but the BatchNorm checkpoint (smallNetTrain); it belongs in "
                             f"--checkpoint (the first argument): bnstrip verify {fused} FOLDED.pt") from None
        if _is_folded_smallnet(checkpoint):
            raise InputError(f"{checkpoint}: not the BatchNorm checkpoint (smallNetTrain) but a folded smallNetTest state_dict; "
                             f"it belongs in --fused (the second argument): bnstrip verify {DEFAULT_CHECKPOINT} {checkpoint}"
                             ) from None
        raise InputError(str(exc).replace(" or use --arch", "")) from None  # verify has no --arch
    for note in notes:
        warn(note)
    images, labels = split.images, split.labels
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    with Progress("verifying") as progress:
        result = verify_models(bn_model, folded_model, images, labels, batch_size=batch_size, tolerance=tolerance,
                               threads=DEFAULT_THREADS if threads is None else threads, progress=progress)
    if as_json:
        emit_json({**core_json("verify", result.passed, result.seconds, data_md5=split.md5, threads=result.threads,
                               cpu_capability=_cpu_capability()),
                   **result.to_dict(), "checkpoint": checkpoint, "fused": fused, "data": str(split.source)})
    else:
        _print_table(result, checkpoint, fused, str(split.source), split.md5)
    if not result.passed:
        raise CheckFailed(_failure(result, fused))


def _verified_other_format(checkpoint: str, fused: str | None, inputs_file: str | None, as_json: bool) -> bool:
    """Two exported programs (issue 13) or two ONNX models (issue 20) are compared on inputs, not on CIFAR-10."""
    from bnstrip.cli.onnx import verify_onnx
    from bnstrip.cli.program import _is_program, verify_programs
    from bnstrip.io.sniff import is_onnx_file

    if fused is not None and (is_onnx_file(checkpoint) or is_onnx_file(fused)):
        verify_onnx(checkpoint, fused, inputs_file, as_json)
        return True
    if fused is not None and (_is_program(checkpoint) or _is_program(fused)):
        verify_programs(checkpoint, fused, inputs_file, as_json)
        return True
    return False


def _cpu_capability() -> str:
    """The instruction set torch's CPU kernels use (AVX2, AVX512, ...): with the torch version, what the last
    digits of the figures depend on."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def _print_table(result, checkpoint: str, fused: str | None, source: str, md5: str) -> None:
    rows = [
        ["max over batches of ||diff||^2", fmt(result.max_batch_sq_norm), f"< {fmt(result.tolerance)}"],
        ["max |diff|", fmt(result.max_abs_diff), ""],
        ["predicted class agrees", f"{result.agreement:.2%}", ""],
        ["accuracy, BN model", f"{result.accuracy_bn:.2%}", ""],
        ["accuracy, folded model", f"{result.accuracy_folded:.2%}", ""],
        ["images (batch size)", f"{result.images} ({result.batch_size})", ""],
        ["workers x torch threads (CPU kernels)", f"{result.threads} x 1 ({_cpu_capability()})", ""],
        ["verify time", f"{result.seconds:.2f} s", ""],
    ]
    console = stdout_console()
    console.print(plain(f"verify {checkpoint} vs {fused or 'folded in memory'} on {source} (test_batch md5 {md5})"))
    console.print(make_table("", ["figure", "value", "bar"], rows))
    console.print("[bold green]PASS[/]" if result.passed else "[bold red]FAIL[/]")


def _failure(result, fused: str | None) -> str:
    """Why verify failed, with the way out when the folded file is not float32 (the course's bar is a float32 bar)."""
    text = (f"max over batches of ||diff||^2 is {fmt(result.max_batch_sq_norm)}, not below the tolerance "
            f"{fmt(result.tolerance)}")
    dtypes = _fused_dtypes(fused) - {"float32"}
    if dtypes:
        text += (f"; {fused} holds {', '.join(sorted(dtypes))} weights and the course's 1e-8 bar is a float32 bar: "
                 f"refold in float32 with `bnstrip fuse --dtype float32`")
    return text
