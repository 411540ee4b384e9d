"""fuse_arch_to_onnx: a checkpoint and --arch -> fold_model -> torch.onnx.export -> the file proven -> OUT.onnx.

The folded module is exported with torch's TorchScript-based exporter (`dynamo=False`): it
runs offline and needs nothing beyond torch and onnx (the torch.export-based one needs
onnxscript). The exported file, parsed with onnxfold.load's bounds, is run in onnxruntime and
compared by core.compare's comparator with the *original* (unfolded) module evaluated in
float64, so the proof covers the fold and the export together. Runs the user's --arch code,
by design.
"""
from __future__ import annotations

import io
import time
from typing import Any

from bnstrip.errors import CheckFailed


def export_bytes(model: Any, example: Any, opset: int | None = None) -> bytes:
    """The module exported to ONNX in memory (dynamo=False; see the module docstring)."""
    import torch

    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (example,), buffer,  # type: ignore[arg-type]
                          dynamo=False, opset_version=opset, input_names=["input"], do_constant_folding=True)
    return buffer.getvalue()


def prove_file(data: bytes, original: Any, example: Any, shown: str) -> Any:
    """The exported bytes against the original module: core.compare's rule on ORT's outputs; the model proto."""
    import torch

    from bnstrip.core.compare import (
        compare_outputs,
        float64_outputs,
        model_dtype,
        output_leaves,
        seeded_outputs,
    )
    from bnstrip.onnxfold.check import run_ort
    from bnstrip.onnxfold.load import check_model, parse_model

    model = parse_model(data, shown)
    check_model(model, shown, None)
    reference = output_leaves(seeded_outputs(original, (example,)))[1]
    reference64 = float64_outputs(original, (example,))
    wide = output_leaves(reference64)[1] if reference64 is not None else None
    try:
        got = run_ort(model.SerializeToString(), {model.graph.input[0].name: example.numpy()})
    except Exception as exc:  # noqa: BLE001 - the exported file must run
        raise CheckFailed(f"{shown}: onnxruntime cannot run the exported model ({type(exc).__name__}); not writing "
                          "it") from None
    report = compare_outputs(reference, [torch.from_numpy(g) for g in got], wide, model_dtype(original), 1)
    if report is None or not report.passed:
        figures = report.describe() if report is not None else "its outputs have other shapes"
        raise CheckFailed(f"{shown}: the exported folded model differs from the original: {figures}; not writing it")
    return model, report


def fuse_arch_to_onnx(input_path: str, output_path: str, arch: str, shape: list[int], *,
                      eps: float | None = None, force: bool = False, allow_overflow: bool = False,
                      dtype: str = "keep", arch_kwargs: str | None = None) -> Any:
    """Fold the checkpoint in --arch's model, export the folded module, prove the file, write OUT.onnx."""
    from bnstrip import __version__
    from bnstrip.arch import arch_factory, parse_arch_kwargs
    from bnstrip.core.compare import model_dtype, seeded_inputs
    from bnstrip.fold.model import fold_model
    from bnstrip.io.checkpoint import load_checkpoint
    from bnstrip.io.manifest import manifest_path
    from bnstrip.onnxfold.save import OnnxFuseReport, check_onnx_outputs, write_onnx
    from bnstrip.pipeline import _converted, build_loaded

    started = time.perf_counter()
    factory = arch_factory(arch, parse_arch_kwargs(arch_kwargs))  # a wrong spec is named before any file is read
    loaded = load_checkpoint(input_path)
    check_onnx_outputs(output_path, [input_path], force, external=False)
    model = build_loaded(factory, _converted(loaded.state_dict, dtype, str(input_path)), input_path)
    example = seeded_inputs(shape, seed=0).to(model_dtype(model))
    result = fold_model(model, (example,), eps=eps, allow_overflow=allow_overflow)
    if result.check is None or not result.check.passed:
        raise CheckFailed(f"{input_path}: folded {arch} differs from the original; not writing {output_path}")
    proto, report = prove_file(export_bytes(result.model.eval(), example), model, example, output_path)
    result.check = report
    manifest = {"bnstrip_version": __version__, "architecture": arch, "input_shape": shape,
                "source": str(input_path), "source_sha256": loaded.sha256, "output": output_path,
                **result.manifest_entries(),
                "self_check": {"max_abs_diff": report.max_abs_diff, "output_scale": report.output_scale,
                               "rounding": report.rounding, "tolerance": report.tolerance, "samples": report.samples}}
    write_onnx(proto, output_path, force, False, manifest)
    return OnnxFuseReport(input=str(input_path), output=str(output_path), manifest=str(manifest_path(output_path)),
                          result=result, arch=arch, input_shape=shape, seconds=time.perf_counter() - started, warnings=list(result.warnings))
