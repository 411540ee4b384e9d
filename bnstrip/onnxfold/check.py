"""The proof of an ONNX fold: the folded graph against a float64 evaluation of the original.

onnxruntime's CPU provider has no float64 Conv, so the float64 reference is onnx's own
reference evaluator run on a float64 copy of the original (`widened`); onnxruntime runs both
graphs in their own dtype (with its graph optimisations off, so it folds nothing itself).
The rule is core.compare's: the fold's error against float64 may be a small multiple of the
original's own rounding error. `tolerance` is the one place that rule is applied to ONNX
outputs, so it moves with core.compare.tolerance_for. Models are handed to onnxruntime as
bytes bnstrip serialised, never as the input file.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bnstrip.core.compare import MAX_EXAMPLE_ELEMENTS, SelfCheck
from bnstrip.errors import InputError, first_line, printable

SAMPLES = 2
"""Seeded input sets per check; symbolic dimensions are 1 (DIM_PARAM_SIZE)."""
DIM_PARAM_SIZE = 1


def tolerance(dtype: Any, scale: float, rounding: float | None) -> float:
    """The one tolerance for ONNX outputs of numpy dtype `dtype`: core.compare's rule (see the module docstring)."""
    import torch

    from bnstrip.core.compare import tolerance_for

    name = getattr(dtype, "name", str(dtype))
    torch_dtype = getattr(torch, name, torch.float32) if name in ("float16", "float32", "float64") else torch.float32
    return tolerance_for(torch_dtype, scale, rounding)


def _np_type(elem_type: int) -> Any:
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(elem_type)


def seeded_feeds(model: Any, seed: int, shapes: dict[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """Inputs for every graph input that is not an initializer: uniform [0, 1) floats, zeros otherwise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor_type = value.type.tensor_type
        if value.type.WhichOneof("value") != "tensor_type" or not tensor_type.HasField("shape"):
            raise InputError(f"graph input '{value.name}' has no tensor shape; pass inputs to check the model")
        if shapes and value.name in shapes:
            dims = list(shapes[value.name])
        else:
            dims = [d.dim_value if d.HasField("dim_value") else DIM_PARAM_SIZE for d in tensor_type.shape.dim]
        if any(d < 0 for d in dims) or math.prod(dims) > MAX_EXAMPLE_ELEMENTS:
            raise InputError(f"graph input '{printable(value.name)}' declares shape {dims[:8]}, over "
                             f"{MAX_EXAMPLE_ELEMENTS:,} elements; a check needs one small batch: pass inputs")
        dtype = _np_type(tensor_type.elem_type)
        feeds[value.name] = (rng.random(dims).astype(dtype) if dtype.kind == "f" else np.zeros(dims, dtype=dtype))
    return feeds


def run_ort(model_bytes: bytes, feeds: dict[str, Any]) -> list[Any]:
    """The graph's outputs from onnxruntime's CPU provider, its own optimisations off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def widened(model: Any) -> Any:
    """A copy of `model` computing in float64: float tensors, inputs, outputs, value_info and Cast targets widened."""
    import onnx

    from bnstrip.onnxfold.graph import attr
    from bnstrip.onnxfold.load import iter_graphs, iter_tensors

    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    narrow = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    for _, tensor in iter_tensors(wide):
        if tensor.data_type in narrow:
            array = onnx.numpy_helper.to_array(tensor).astype("float64")
            tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    for graph in iter_graphs(wide.graph):
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            if value.type.tensor_type.elem_type in narrow:
                value.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
        for node in graph.node:
            if node.op_type in ("Cast", "CastLike") and attr(node, "to", None) in narrow:
                for entry in node.attribute:
                    if entry.name == "to":
                        entry.i = onnx.TensorProto.DOUBLE
    return wide


def reference64(model: Any, feeds: dict[str, Any]) -> list[Any] | None:
    """The original's outputs evaluated in float64 by onnx's reference evaluator; None where it cannot run it."""
    from onnx.reference import ReferenceEvaluator

    from bnstrip.onnxfold.reference import NEW_OPS

    wide_feeds = {k: (v.astype("float64") if v.dtype.kind == "f" else v) for k, v in feeds.items()}
    try:
        return list(ReferenceEvaluator(widened(model), new_ops=NEW_OPS).run(None, wide_feeds))
    except Exception:  # noqa: BLE001 - an op the evaluator lacks: fall back to comparing in the model's dtype
        return None


def _leaves(outputs: list[Any]) -> list[Any]:
    import numpy as np

    found = []
    for item in outputs:
        if isinstance(item, list):
            found.extend(_leaves(item))
        else:
            found.append(np.asarray(item))
    return found


def compare(original: list[Any], folded: list[Any], original64: list[Any] | None) -> SelfCheck | str:
    """The rule on one input set: a SelfCheck, or why the outputs cannot be compared at all."""
    import numpy as np

    o, f = _leaves(original), _leaves(folded)
    r = _leaves(original64) if original64 is not None else None
    if len(o) != len(f) or any(a.shape != b.shape for a, b in zip(o, f, strict=True)):
        return "the folded graph's outputs have other shapes than the original's"
    diff = scale = rounding = 0.0
    dtype = np.dtype("float32")
    for index, (a, b) in enumerate(zip(o, f, strict=True)):
        if a.dtype.kind != "f":
            if not np.array_equal(a, b):
                diff = math.inf
            continue
        dtype = a.dtype
        truth = r[index].astype("float64") if r is not None else a.astype("float64")
        diff = max(diff, float(np.max(np.abs(b.astype("float64") - truth), initial=0.0)))
        scale = max(scale, float(np.max(np.abs(a.astype("float64")), initial=0.0)))
        if r is not None:
            rounding = max(rounding, float(np.max(np.abs(a.astype("float64") - truth), initial=0.0)))
    if not math.isfinite(diff):
        diff = math.inf
    own = rounding if r is not None else None
    return SelfCheck(max_abs_diff=diff, output_scale=scale, tolerance=tolerance(dtype, scale, own), samples=1,
                     rounding=own)


def merge(checks: list[SelfCheck]) -> SelfCheck:
    """One report for several input sets: the worst fold error against the smallest tolerance."""
    own = [c.rounding for c in checks if c.rounding is not None]
    rounding = max(own) if len(own) == len(checks) else None
    return SelfCheck(max_abs_diff=max(c.max_abs_diff for c in checks), output_scale=max(c.output_scale for c in checks),
                     tolerance=min(c.tolerance for c in checks), samples=len(checks), rounding=rounding)


class Reference:
    """The original model's outputs on the seeded inputs, computed once (ORT in its dtype, reference in float64)."""

    def __init__(self, model: Any, samples: int = SAMPLES, feeds: list[dict[str, Any]] | None = None) -> None:
        self.feeds = feeds if feeds is not None else [seeded_feeds(model, seed) for seed in range(samples)]
        data = model.SerializeToString()
        try:
            self.outputs = [run_ort(data, feed) for feed in self.feeds]
        except Exception as exc:  # noqa: BLE001 - the original must run to be folded with proof
            raise InputError(f"onnxruntime cannot run the original model ({type(exc).__name__}: "
                             f"{first_line(exc, 200, '')}); bnstrip folds only models it can prove") from None
        self.outputs64 = [reference64(model, feed) for feed in self.feeds]

    def check(self, candidate: Any) -> SelfCheck | str:
        """The rule on `candidate` (a ModelProto): a SelfCheck (passed or not), or why it cannot run."""
        data = candidate.SerializeToString()
        reports = []
        for feed, outputs, outputs64 in zip(self.feeds, self.outputs, self.outputs64, strict=True):
            try:
                got = run_ort(data, feed)
            except Exception as exc:  # noqa: BLE001 - the folded graph must run where the original did
                return f"onnxruntime cannot run the folded graph ({type(exc).__name__}: {first_line(exc, 200, '')})"
            report = compare(outputs, got, outputs64)
            if isinstance(report, str):
                return report
            reports.append(report)
        return merge(reports)
