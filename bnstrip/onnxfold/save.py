"""fuse_onnx_file: IN.onnx -> fold_onnx (with its proof) -> OUT.onnx (+ OUT.onnx.data) and OUT.onnx.bnstrip.json.

Every file goes through io.write.write_atomically. When IN kept tensors in external data,
OUT does too, in one file beside it (`OUT.data`): that file is written first, then the
manifest (with OUT's sha256), then OUT is put in place, so a reader never sees an OUT whose
data is missing. Paths are all checked before the work starts, as `fuse` does.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnstrip.core.compare import SelfCheck
from bnstrip.errors import InputError, printable

EXTERNAL_THRESHOLD = 1024
"""Tensors of at least this many bytes go to the external data file (onnx.save's default)."""


NOTHING_TO_CHECK = SelfCheck(max_abs_diff=0.0, output_scale=0.0, tolerance=0.0, samples=0, rounding=None)
"""The report when no BatchNorm folded: OUT is IN's graph, nothing ran (samples=0)."""


@dataclass
class OnnxFuseReport:
    """What fuse_onnx_file did, for the table and the JSON of `bnstrip fuse`."""

    input: str
    output: str
    manifest: str
    result: Any
    data_file: str | None = None
    arch: str | None = None
    input_shape: list[int] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def self_check(self) -> SelfCheck:
        return self.result.check or NOTHING_TO_CHECK

    def to_dict(self) -> dict[str, Any]:
        """The report with the keys of every fuse path (pipeline.fuse_report_dict), plus the external data file."""
        from bnstrip.pipeline import fuse_report_dict

        report = fuse_report_dict(self.input, self.output, self.arch,  # type: ignore[arg-type]  # None: no --arch
                                  self.result.manifest_entries(),
                                  self.self_check, manifest=self.manifest, input_shape=self.input_shape, dtype="keep",
                                  source_format="onnx", warnings=self.warnings, seconds=self.seconds)
        return {**report, "external_data": self.data_file}


def data_path(output: str | Path) -> Path:
    return Path(f"{output}.data")


def externalize(model: Any, location: str) -> bytes:
    """Move every tensor of at least EXTERNAL_THRESHOLD bytes to one data blob named `location`; returns the blob."""
    import onnx

    from bnstrip.onnxfold.load import iter_tensors

    blob = bytearray()
    for _, tensor in iter_tensors(model):
        if not tensor.HasField("raw_data") or len(tensor.raw_data) < EXTERNAL_THRESHOLD:
            continue
        offset = len(blob)
        blob += tensor.raw_data
        blob += b"\0" * (-len(blob) % 64)
        del tensor.external_data[:]
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(tensor.raw_data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
    return bytes(blob)


def check_onnx_outputs(output: str, inputs: list[str], force: bool, external: bool) -> None:
    """Every path the ONNX job writes, checked before any work (io.write.check_output_path)."""
    from bnstrip.io.manifest import manifest_path
    from bnstrip.io.write import check_output_path

    if Path(output).suffix.lower() != ".onnx":
        raise InputError(f"{printable(output)}: the folded model is an ONNX file; name it *.onnx")
    check_output_path(output, list(inputs), force, checkpoint=False)
    check_output_path(manifest_path(output), list(inputs), force, what="manifest", checkpoint=False)
    if external:
        check_output_path(data_path(output), list(inputs), force, what="external data file", checkpoint=False)


def write_onnx(model: Any, output: str, force: bool, external: bool, manifest: dict[str, Any] | None) -> str | None:
    """OUT (and its data file, and the manifest) through the one atomic writer; returns the data file's path."""
    import onnx

    from bnstrip.io.manifest import write_manifest
    from bnstrip.io.write import write_bytes_atomically

    final = onnx.ModelProto()
    final.CopyFrom(model)
    data_file = None
    if external:
        data_file = data_path(output)
        blob = externalize(final, data_file.name)
        write_bytes_atomically(data_file, blob, replace=force)
    payload = final.SerializeToString()

    def manifest_first(tmp_name: str) -> None:
        if manifest is not None:
            write_manifest(output, {**manifest, "output_sha256": hashlib.sha256(payload).hexdigest()}, force=force)

    write_bytes_atomically(Path(output), payload, replace=force, before_replace=manifest_first)
    return None if data_file is None else str(data_file)


def fuse_onnx_file(input_path: str, output_path: str, *, force: bool = False, allow_overflow: bool = False,
                   feeds: list[dict[str, Any]] | None = None) -> OnnxFuseReport:
    """Fold IN.onnx and write OUT.onnx with its manifest (see the module docstring)."""
    from bnstrip import __version__
    from bnstrip.io.manifest import manifest_path
    from bnstrip.onnxfold.fold import fold_onnx
    from bnstrip.onnxfold.load import load_onnx

    started = time.perf_counter()
    loaded = load_onnx(input_path)  # IN first: a swapped IN/OUT is named as such
    check_onnx_outputs(output_path, [input_path], force, loaded.external)
    result = fold_onnx(loaded, allow_overflow=allow_overflow, feeds=feeds)
    check = result.check or NOTHING_TO_CHECK
    manifest = {
        "bnstrip_version": __version__, "architecture": "onnx", "input_shape": [], "source": str(input_path),
        "source_sha256": loaded.sha256, "output": Path(output_path).name, **result.manifest_entries(),
        "self_check": {"max_abs_diff": check.max_abs_diff, "output_scale": check.output_scale,
                       "rounding": check.rounding, "tolerance": check.tolerance, "samples": check.samples},
    }
    data_file = write_onnx(result.model, output_path, force, loaded.external, manifest)
    return OnnxFuseReport(input=str(input_path), output=str(output_path), manifest=str(manifest_path(output_path)),
                          result=result, data_file=data_file, seconds=time.perf_counter() - started,
                          warnings=list(result.warnings))
