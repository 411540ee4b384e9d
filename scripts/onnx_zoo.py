"""Benchmark: bnstrip's ONNX fold against onnxoptimizer, onnxsim and onnxruntime's basic-level graph (issue 20).

Inputs: bnstrip's zoo models (bnstrip/testing/zoo.py, randomised BN statistics) exported with torch's
TorchScript exporter in TrainingMode.PRESERVE without constant folding (otherwise the exporter
folds Conv+BN itself and there is nothing left to fold), plus the hand-built graphs of
bnstrip.onnxfold.samples (patterns exporters never produce: grouped ConvTranspose, BN -> Conv,
3-D MatMul, shared weights, opset 9, subgraphs).

Each tool's output is checked the same way: BatchNormalization nodes left (in every subgraph),
outputs against a float64 evaluation of the original (bnstrip.onnxfold.check's rule: WRONG
when the error is beyond a small multiple of the original's own rounding; BROKEN when the
output model does not run in onnxruntime), crashes, and the tool's own time (not the check's). Peers that are not installed are reported as such.

    python scripts/onnx_zoo.py [--json] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def bn_left(model: Any) -> int:
    from bnstrip.onnxfold.load import iter_graphs

    return sum(n.op_type == "BatchNormalization" for g in iter_graphs(model.graph) for n in g.node)


def tool_bnstrip(model: Any) -> Any:
    from bnstrip.onnxfold.fold import fold_onnx

    return fold_onnx(model).model


def tool_onnxoptimizer(model: Any) -> Any:
    import onnxoptimizer

    return onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])


def tool_onnxsim(model: Any) -> Any:
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    return simplified


def tool_ort_basic(model: Any) -> Any:
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "opt.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = path
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(path)


TOOLS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "bnstrip": ("bnstrip", tool_bnstrip),
    "onnxoptimizer": ("onnxoptimizer", tool_onnxoptimizer),
    "onnxsim": ("onnxsim", tool_onnxsim),
    "ort-basic": ("onnxruntime", tool_ort_basic),
}


def available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_tool(tool: Callable[[Any], Any], model: Any, reference: Any) -> dict[str, Any]:
    """BNs left, wrong (against float64), crash, seconds for one tool on one model."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    started = time.perf_counter()
    try:
        out = tool(copy)
    except Exception as exc:  # noqa: BLE001 - a crash is a result here
        return {"crash": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}
    seconds = time.perf_counter() - started
    report = reference.check(out)
    broken = isinstance(report, str)  # the tool's output does not run (or has other outputs)
    return {"left": bn_left(out), "broken": broken, "wrong": not broken and not report.passed, "seconds": seconds,
            "error": report if isinstance(report, str) else report.max_abs_diff,
            "tolerance": None if isinstance(report, str) else report.tolerance}


def cases(only: list[str] | None) -> list[tuple[str, Callable[[], Any]]]:
    from bnstrip.onnxfold.samples import SAMPLES
    from bnstrip.testing.onnx_zoo import export_zoo
    from bnstrip.testing.zoo import ZOO

    found = [(f"zoo:{name}", (lambda n=name: export_zoo(n))) for name in ZOO]
    found += [(f"hand:{name}", build) for name, build in SAMPLES.items()]
    return [(n, b) for n, b in found if not only or any(o in n for o in only)]


def cell(row: dict[str, Any]) -> str:
    if row is None:
        return "not installed"
    if "crash" in row:
        return "crash"
    return f"{row['left']}" + (" WRONG" if row["wrong"] else "") + (" BROKEN" if row["broken"] else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    import onnx

    from bnstrip.onnxfold.check import Reference

    rows = []
    for name, build in cases(args.only):
        try:
            model = build()
        except Exception as exc:  # noqa: BLE001 - an export that fails is reported, not fatal
            rows.append({"model": name, "export_error": f"{type(exc).__name__}: {str(exc)[:100]}"})
            continue
        try:
            reference = Reference(model)
        except Exception as exc:  # noqa: BLE001 - an exported file onnxruntime cannot run is reported
            rows.append({"model": name, "export_error": f"the exported original does not run: {str(exc)[:150]}"})
            continue
        row = {"model": name, "bn": bn_left(model), "opset": model.opset_import[0].version}
        for tool, (module, fn) in TOOLS.items():
            row[tool] = run_tool(fn, model, reference) if available(module) else None
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{t} {cell(row[t])}" for t in TOOLS), file=sys.stderr)
    if args.json:
        print(json.dumps({"onnx": onnx.__version__, "rows": rows}, indent=2, default=str))
        return
    print_markdown(rows)


def print_markdown(rows: list[dict[str, Any]]) -> None:
    tools = list(TOOLS)
    print("| model | BN | " + " | ".join(f"{t}: left" for t in tools) + " |")
    print("|---|---|" + "---|" * len(tools))
    for row in rows:
        if "export_error" in row:
            print(f"| {row['model']} | export failed: {row['export_error']} |" + " |" * len(tools))
            continue
        print(f"| {row['model']} | {row['bn']} | " + " | ".join(cell(row[t]) for t in tools) + " |")
    print()
    print("| tool | BN left (total) | files with BN left | wrong outputs | broken (does not run) | crashes | "
          "time (total) |")
    print("|---|---|---|---|---|---|---|")
    for tool in tools:
        done = [r[tool] for r in rows if "export_error" not in r and r.get(tool) is not None]
        if not done:
            print(f"| {tool} | not installed | | | | | |")
            continue
        ok = [d for d in done if "crash" not in d]
        print(f"| {tool} | {sum(d['left'] for d in ok)} | {sum(d['left'] > 0 for d in ok)} | "
              f"{sum(d['wrong'] for d in ok)} | {sum(d['broken'] for d in ok)} | {len(done) - len(ok)} | "
              f"{sum(d['seconds'] for d in ok):.2f} s |")


if __name__ == "__main__":
    main()
