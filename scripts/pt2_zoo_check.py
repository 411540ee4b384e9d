"""Fold every zoo model as a `.pt2` (torch.export.save, static and dynamic batch) and print what was folded as JSON.

Run it under two checkouts on the same folder to compare loaders (the files are written once, then reused):

    PYTHONPATH=/path/a python scripts/pt2_zoo_check.py DIR > a.json
    PYTHONPATH=/path/b python scripts/pt2_zoo_check.py DIR > b.json && diff a.json b.json
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def _export(name: str, dynamic: bool, path: Path) -> bool:
    from bnstrip.testing import zoo

    if path.exists():
        return True
    model, x = zoo.build(name)
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    try:
        program = torch.export.export(model, (x,), dynamic_shapes=shapes)
    except Exception:  # noqa: BLE001 - models torch.export cannot take (data-dependent control flow)
        return False
    torch.export.save(program, path)
    return True


def main(folder: str) -> None:
    import bnstrip
    from bnstrip.testing import zoo
    from bnstrip.io.pt2 import load_program

    out: dict[str, object] = {}
    for name in zoo.ZOO:
        for dynamic in (False, True):
            path = Path(folder) / f"{name}{'_dynamic' if dynamic else ''}.pt2"
            if not _export(name, dynamic, path):
                out[path.name] = "torch.export fails"
                continue
            started = time.perf_counter()
            program = load_program(path)
            loaded = time.perf_counter() - started
            result = bnstrip.fold_program(program)
            out[path.name] = {"folded": sorted(map(list, result.folded)),
                              "skipped": sorted(bn for bn, _ in result.skipped),
                              "dynamic_dims": len(result.dynamic_dims),
                              "ranges": sorted(f"{int(r.lower)}..{int(r.upper)}"
                                               for r in result.program.range_constraints.values()),
                              "passed": bool(result.self_check and result.self_check.passed)}
            print(f"{path.name}: load {loaded:.2f} s", file=sys.stderr)
    print(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
