"""Inference speed of multi-branch blocks: BN model vs BN-folded (branches kept) vs merged into one conv.

Blocks are the replicas in bnstrip.fold.reparam_blocks at typical stage sizes (RepVGG 64 ch at 56x56,
grouped RepVGG, MobileOne depthwise and pointwise with 4 branches, ACNet). Timings are interleaved
rounds (bnstrip.bench.time_interleaved); a speed-up is the median of paired ratios, "within noise"
when the spreads overlap. The merged block's outputs are checked against the BN model first.

    nice python scripts/bench_reparam.py --out /tmp/reparam-bench.md [--threads 2] [--repeat 10]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from bnstrip import fold_model
from bnstrip.bench import compare, time_interleaved, torch_threads
from bnstrip.fold.reparam_blocks import ACBlock, MobileOneBlock, RepVGGBlock, randomize_bn

BLOCKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
    "RepVGG 64->64 (3x3+1x1+id)": (lambda: RepVGGBlock(64, 64), (64, 56, 56)),
    "RepVGG 128 groups=4": (lambda: RepVGGBlock(128, 128, groups=4), (128, 28, 28)),
    "MobileOne dw 3x3 x4 +1x1+skip": (lambda: MobileOneBlock(64, 64, 3, groups=64, branches=4), (64, 56, 56)),
    "MobileOne pw 1x1 x4 +skip": (lambda: MobileOneBlock(64, 64, 1, branches=4), (64, 56, 56)),
    "ACNet 3x3+1x3+3x1": (lambda: ACBlock(64, 64), (64, 56, 56)),
}


def bench_block(name: str, build: Callable[[], nn.Module], shape: tuple[int, ...], batches: list[int],
                repeat: int) -> list[str]:
    model = randomize_bn(build())
    probe = torch.rand(2, *shape)
    folded = fold_model(model, (probe,)).model
    merged = fold_model(model, (probe,), reparameterize=True)
    assert merged.merged and merged.check is not None and merged.check.passed, merged.merge_refused
    rows = []
    for batch in batches:
        x = torch.rand(batch, *shape)
        with torch.inference_mode():
            candidates = {"bn": lambda: model(x), "folded": lambda: folded(x), "merged": lambda: merged.model(x)}
            timings = time_interleaved(candidates, repeat=repeat, warmup=2)
        vs_bn = compare(timings["bn"], timings["merged"])
        vs_folded = compare(timings["folded"], timings["merged"])
        ms = {k: t.median * 1e3 for k, t in timings.items()}
        rows.append(f"| {name} | {batch} | {ms['bn']:.2f} | {ms['folded']:.2f} | {ms['merged']:.2f} | "
                    f"{vs_bn.median:.2f}x ({vs_bn.verdict}) | {vs_folded.median:.2f}x ({vs_folded.verdict}) |")
        print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here (default: stdout)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--batches", default="1,32")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    started = time.perf_counter()
    with torch_threads(args.threads) as threads:
        rows = [row for name, (build, shape) in BLOCKS.items() for row in bench_block(name, build, shape, batches,
                                                                                       args.repeat)]
    header = [f"torch {torch.__version__}, {platform.machine()}, {threads} threads, {args.repeat} interleaved rounds, "
              f"{time.perf_counter() - started:.0f} s in all; median ms per forward.", "",
              "| block | batch | BN model | BN folded | merged | merged vs BN | merged vs folded |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    text = "\n".join(header + rows) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
