"""`bnstrip bench`: time the BatchNorm model against the folded one.

Only click is imported at module level, so `bnstrip --help` stays fast.
"""
from __future__ import annotations

import os
import time

import click

from bnstrip.cli.common import (DEFAULT_CHECKPOINT, Progress, core_json, emit_json, fmt, handle_errors, make_table,
                                stdout_console, warn)
from bnstrip.cli.types import MAX_BATCH, MAX_LIST_ITEMS, MAX_LIST_VALUE, THREADS, BoundedInt, bounded_int_list


def _positive_int_list(text: str, name: str) -> list[int]:
    """Positive integers (batch sizes at most MAX_BATCH); click.BadParameter naming the option and range otherwise."""
    batch = name == "--batch-size"
    return bounded_int_list(text, name, 1, MAX_BATCH if batch else MAX_LIST_VALUE, 64 if batch else MAX_LIST_ITEMS)


def _ms(seconds: float) -> str:
    return fmt(seconds * 1e3)


@click.command()
@click.option("--arch", default="smallnet", show_default=True, metavar="SOURCE | smallnet",
              help="The model: smallNet (folded from --checkpoint, default smallNetSaved), MODULE:CALLABLE, "
                   "torchvision:NAME, timm:NAME or ultralytics:CONFIG.yaml; without --checkpoint it gets random "
                   "weights and randomised BatchNorm statistics.")
@click.option("--arch-kwargs", default=None, metavar="JSON",
              help="Keyword arguments for the --arch class or factory, a JSON object, e.g. '{\"num_classes\": 10}'.")
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Weights to load (smallNet: a smallNetTrain checkpoint; default smallNetSaved).")
@click.option("--input-shape", default=None, metavar="N,C,H,W",
              help="Input shape, batch dimension first as for `fuse` (default 1,3,32,32); N is replaced by each "
                   "--batch-size.")
@click.option("--batch-size", "batch_sizes", default="1,32,100", show_default=True, metavar="N[,N...]",
              help="Batch sizes to time, comma-separated.")
@click.option("--threads", default=None, type=THREADS,
              help="torch intra-op threads while timing (default: torch's current setting).")
@click.option("--repeat", default=20, show_default=True, type=BoundedInt(1, 100_000),
              help="Interleaved rounds per batch size (each round times both models).")
@click.option("--warmup", default=3, show_default=True, type=BoundedInt(0, 100_000), help="Untimed calls per model first.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@handle_errors
def bench(arch: str, arch_kwargs: str | None, checkpoint: str | None, input_shape: str | None, batch_sizes: str,
          threads: int | None, repeat: int, warmup: int, as_json: bool) -> None:
    """Time the BatchNorm model (eval) against bnstrip's folded model, interleaved A B A B.

    Per batch size: median and min latency of each, and the speed-up (median of the
    rounds' paired ratios, with min-max spread); "within noise" where the two timings' interquartile
    ranges overlap or the ratios' interquartile range contains 1.
    """
    started = time.perf_counter()
    sizes = _positive_int_list(batch_sizes, "--batch-size")
    shape = None
    if input_shape:
        full = tuple(_positive_int_list(input_shape, "--input-shape"))
        if len(full) < 2:
            raise click.BadParameter(f"{input_shape!r} has no batch dimension; write N,C,H,W (e.g. 1,3,224,224), "
                                     "batch first as for `bnstrip fuse`", param_hint="--input-shape")
        shape = full[1:]

    from bnstrip.bench import bench_pair

    pair, used_checkpoint, label = _pair(arch, arch_kwargs, shape, input_shape, checkpoint)
    for note in pair.notes:
        warn(note)
    with Progress("timing") as progress:
        report = bench_pair(pair.bn_model, pair.folded_model, pair.sample_shape, sizes, repeat=repeat, warmup=warmup,
                            threads=threads, progress=progress)
    if as_json:
        emit_json({**core_json("bench", True, time.perf_counter() - started), "arch": arch,
                   "checkpoint": used_checkpoint, "folded": pair.folded, **report.to_dict()})
        return
    rows = []
    for result in report.results:
        bn, folded, speedup = result.bn.spread, result.folded.spread, result.speedup.spread
        rows.append([result.batch_size, f"{_ms(bn.median)} ({_ms(bn.min)})", f"{_ms(folded.median)} ({_ms(folded.min)})",
                     f"{speedup.median:.2f}x ({speedup.min:.2f}-{speedup.max:.2f})", result.speedup.verdict])
    console = stdout_console()
    console.print(make_table(f"bench {label}: {pair.folded} BatchNorm(s) folded, {report.threads} thread(s), "
                             f"{report.repeat} rounds, torch {report.torch_version}",
                             ["batch", "BN model ms", "folded ms", "speed-up", "verdict"], rows, markup=False))
    console.print("ms per call: median (min) over the rounds; speed-up: BN time / folded time, median (min-max) of "
                  "the rounds' paired ratios; 'within noise': the two timings' interquartile ranges overlap, or the ratios' contains 1.")



def _pair(arch: str, arch_kwargs: str | None, shape: tuple[int, ...] | None, input_shape: str | None,
          checkpoint: str | None):  # noqa: ANN202 - (ModelPair, checkpoint used, label)
    """The BN model and its fold: smallNet from its checkpoint, or the --arch model (with --arch-kwargs)."""
    from bnstrip.bench import DEFAULT_SAMPLE_SHAPE, SMALLNET_ARCH, arch_pair, smallnet_pair
    from bnstrip.errors import InputError

    if arch.strip().lower() == SMALLNET_ARCH:
        if arch_kwargs is not None:
            raise click.UsageError("--arch-kwargs goes with a model given by --arch")
        if shape is not None and shape != DEFAULT_SAMPLE_SHAPE:
            raise click.BadParameter(f"smallNet takes N,3,32,32 inputs, not {input_shape}", param_hint="--input-shape")
        path = checkpoint or DEFAULT_CHECKPOINT
        if not os.path.exists(path):
            raise InputError(f"{path}: no smallNet checkpoint here; pass --checkpoint FILE (a smallNetTrain state_dict) "
                             "or --arch MODULE:CALLABLE")
        click.echo(f"bnstrip: loading and folding {path}", err=True)
        return smallnet_pair(path), path, f"smallNet ({path})"
    from bnstrip.arch import parse_arch_kwargs

    kwargs = parse_arch_kwargs(arch_kwargs)
    click.echo(f"bnstrip: building {arch} and folding it", err=True)
    pair = arch_pair(arch, shape or DEFAULT_SAMPLE_SHAPE, checkpoint, kwargs=kwargs)
    return pair, checkpoint, f"{arch} ({checkpoint or 'random weights, randomised BatchNorm statistics'})"
