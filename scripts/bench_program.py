"""Fold time and inference speed-up of folded exported programs (.pt2) on the zoo replicas and smallNet.

    python scripts/bench_program.py [--repeats 30] [--out FILE.md]

Each model is exported with torch.export, folded with bnstrip.fold_program (timed, including
its own check), and the original and folded programs' module() are timed in interleaved runs
(min and median over --repeats, 1 thread). Numbers depend on the machine; run it on a quiet one.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import bnstrip
from bnstrip.testing import zoo
from bnstrip.homework.models import SmallNetTrain


def _models():
    for name in ("ResNet18Style", "MobileNetV2Style"):
        model, x = zoo.build(name)
        yield name, model, torch.randn(8, *x.shape[1:])
    torch.manual_seed(0)
    yield "smallNet", zoo.randomize_bn(SmallNetTrain()).eval(), torch.randn(8, 3, 32, 32)


def _time(fn, x, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = ["| model | BNs folded | fold time (s) | original ms (min / median) | folded ms (min / median) | speed-up (median) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, model, x in _models():
        program = torch.export.export(model, (x,))
        start = time.perf_counter()
        result = bnstrip.fold_program(program)
        fold_seconds = time.perf_counter() - start
        original, folded = program.module(), result.program.module()
        with torch.inference_mode():
            for _ in range(3):
                original(x), folded(x)
            a, b = [], []
            for _ in range(args.repeats):  # interleaved, so load changes hit both alike
                a += _time(original, x, 1)
                b += _time(folded, x, 1)
        med_a, med_b = statistics.median(a) * 1e3, statistics.median(b) * 1e3
        rows.append(f"| {name} (batch {x.shape[0]}) | {len(result.folded)}/{len(result.folded) + len(result.skipped)} "
                    f"| {fold_seconds:.2f} | {min(a) * 1e3:.2f} / {med_a:.2f} | {min(b) * 1e3:.2f} / {med_b:.2f} "
                    f"| {med_a / med_b:.2f}x |")
    text = "\n".join(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
