"""verify_models: is ONNX model B the same function as ONNX model A? (`bnstrip verify A.onnx B.onnx`)

B runs in onnxruntime and is compared with A evaluated in float64 (onnxfold.check's rule, the
same as fold_onnx's proof), on seeded inputs or on the arrays of an `.npz` / `.safetensors`
file, matched to the graph inputs by name (or, failing that, in order). Both models are read
with onnxfold.load's bounds; the inputs file with the checks its format needs.
"""
from __future__ import annotations

import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnstrip.core.compare import SelfCheck
from bnstrip.errors import CheckFailed, InputError, printable

MAX_NPZ_MEMBER_BYTES = 1 << 30
"""One array of an .npz inputs file (uncompressed): inputs for a check are small."""


@dataclass
class VerifyResult:
    check: SelfCheck
    seconds: float


def _npz_arrays(path: str) -> dict[str, Any]:
    import numpy as np

    shown = printable(path)
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.file_size > MAX_NPZ_MEMBER_BYTES or not info.filename.endswith(".npy"):
                    raise InputError(f"{shown}: member {printable(info.filename)[:80]} is not a bounded .npy array; "
                                     "write the inputs with numpy.savez")
        with np.load(path, allow_pickle=False) as data:
            return {name: np.asarray(data[name]) for name in data.files}
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise InputError(f"{shown}: not a readable .npz file ({printable(str(exc))[:120]}); write it with "
                         "numpy.savez") from None


def _safetensors_arrays(path: str) -> dict[str, Any]:
    from bnstrip.io.safetensors_check import read_tensors, validate_safetensors
    from bnstrip.io.sniff import open_regular_file

    with open_regular_file(path) as f:
        layout = validate_safetensors(f, os.fstat(f.fileno()).st_size, Path(path))
        tensors = read_tensors(f, layout, Path(path))
    return {name: tensor.numpy() for name, tensor in tensors.items()}


def load_inputs(path: str, model: Any) -> list[dict[str, Any]]:
    """One feed {graph input: array} from an .npz or .safetensors file, each array in the input's dtype and shape."""
    from bnstrip.io.sniff import looks_like_safetensors, open_regular_file
    from bnstrip.onnxfold.check import seeded_feeds

    with open_regular_file(path) as f:
        head = f.read(16)
    arrays = _npz_arrays(path) if head.startswith(b"PK") else (
        _safetensors_arrays(path) if looks_like_safetensors(head) else None)
    if arrays is None:
        raise InputError(f"{printable(path)}: --inputs must be an .npz or .safetensors file")
    template = seeded_feeds(model, 0)
    names = list(template)
    if set(arrays) != set(names):
        if len(arrays) != len(names):
            raise InputError(f"{printable(path)}: holds {len(arrays)} arrays but the model has {len(names)} inputs "
                             f"({', '.join(names)}); name them after the inputs")
        arrays = dict(zip(names, arrays.values(), strict=True))
    feed = {}
    for name in names:
        want = template[name]
        got = arrays[name]
        if got.ndim != want.ndim:
            raise InputError(f"{printable(path)}: array '{printable(name)}' has rank {got.ndim}, the model's input "
                             f"has rank {want.ndim}")
        feed[name] = got.astype(want.dtype)
    return [feed]


def verify_models(first: str, second: str, inputs_file: str | None = None) -> VerifyResult:
    """B (`second`) against A (`first`) in float64; CheckFailed if B cannot even run where A does."""
    from bnstrip.onnxfold.check import Reference
    from bnstrip.onnxfold.load import load_onnx

    started = time.perf_counter()
    a, b = load_onnx(first), load_onnx(second)
    names_a = [v.name for v in a.model.graph.input]
    inits_a = {t.name for t in a.model.graph.initializer}
    names_b = [v.name for v in b.model.graph.input if v.name not in {t.name for t in b.model.graph.initializer}]
    if [n for n in names_a if n not in inits_a] != names_b:
        raise InputError(f"{printable(second)}: its inputs {names_b} are not {printable(first)}'s; compare models of "
                         "the same graph")
    feeds = load_inputs(inputs_file, a.model) if inputs_file else None
    reference = Reference(a.model, feeds=feeds)
    report = reference.check(b.model)
    if isinstance(report, str):
        raise CheckFailed(f"{printable(second)}: {report}")
    return VerifyResult(report, time.perf_counter() - started)
