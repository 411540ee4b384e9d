"""Hostile and broken `.onnx` files through `bnstrip fuse`: one line, exit 2, nothing written, the input unchanged.

Each case writes its own file: external data that escapes the model's folder (.., absolute,
symlink), lies about its length, raw_data that disagrees with the shape, absurd or negative
dims, bombs (counts over the bounds), truncated and random bytes, old opsets.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from click.testing import CliRunner

from bnstrip.cli import main
from bnstrip.onnxfold import samples


def _external(tmp: Path, location: str, offset: int = 0, length: int | None = None, blob: bytes | None = None) -> Path:
    """conv_bn with W stored externally at `location` (blob written to tmp/data.bin when given)."""
    model = samples.conv_bn()
    weight = next(t for t in model.graph.initializer if t.name == "W")
    raw = onnx.numpy_helper.to_array(weight).tobytes()
    if blob is not None:
        (tmp / "data.bin").write_bytes(blob if blob != b"auto" else raw)
    weight.ClearField("raw_data")
    del weight.float_data[:]
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length or len(raw)))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    path = tmp / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _tensor_case(mutate: Callable) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        model = samples.conv_bn()
        mutate(next(t for t in model.graph.initializer if t.name == "W"))
        path = tmp / "model.onnx"
        path.write_bytes(model.SerializeToString())
        return path
    return make


def _symlink_out(tmp: Path) -> Path:
    outside = tmp.parent / f"{tmp.name}-outside.bin"
    outside.write_bytes(b"\0" * 4096)
    os.symlink(outside, tmp / "link.bin")
    return _external(tmp, "link.bin")


def _raw(tensor) -> None:
    tensor.raw_data = tensor.raw_data[:-4]


def _dims(tensor) -> None:
    del tensor.dims[:]
    tensor.dims.extend([1 << 40, 1 << 40])


def _negative(tensor) -> None:
    tensor.dims[0] = -8


def _typed(tensor) -> None:
    values = onnx.numpy_helper.to_array(tensor).ravel()[:-1]
    tensor.ClearField("raw_data")
    tensor.float_data.extend(values.tolist())


def _write(data: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / "model.onnx"
        path.write_bytes(data)
        return path
    return make


def _truncated(tmp: Path) -> Path:
    data = samples.conv_bn().SerializeToString()
    return _write(data[: len(data) // 2])(tmp)


def _old_opset(tmp: Path) -> Path:
    model = samples.conv_bn()
    model.opset_import[0].version = 5
    return _write(model.SerializeToString())(tmp)


def _huge_input(tmp: Path) -> Path:
    model = samples.conv_bn()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value = 1 << 40
    return _write(model.SerializeToString())(tmp)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (the API itself cannot build messages this deep)."""
    length, size = b"", len(payload)
    while True:
        byte = size & 0x7F
        size >>= 7
        length += bytes([byte | (0x80 if size else 0)])
        if not size:
            break
    return bytes([number << 3 | 2]) + length + payload


def _deep(tmp: Path) -> Path:
    """If nodes nested 300 deep, written on the wire: protobuf's depth limit refuses it while parsing."""
    graph = _field(2, b"leaf")
    for _ in range(300):
        attribute = _field(1, b"then_branch") + _field(6, graph) + bytes([20 << 3, 5])
        node = _field(4, b"If") + _field(5, attribute)
        graph = _field(1, node) + _field(2, b"g")
    model = bytes([0x08, 8]) + _field(7, graph) + _field(8, bytes([0x10, 17]))
    return _write(model)(tmp)


CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "graph input 2**40": (_huge_input, "elements"),
    "nested 200 deep": (_deep, "onnx model"),
    "external ..": (lambda tmp: _external(tmp, "../data.bin"), "inside the model's folder"),
    "external absolute": (lambda tmp: _external(tmp, "/etc/passwd"), "inside the model's folder"),
    "external symlink out": (_symlink_out, "outside the model's folder"),
    "external past the end": (lambda tmp: _external(tmp, "data.bin", offset=64, blob=b"auto"), "truncated"),
    "external length lies": (lambda tmp: _external(tmp, "data.bin", length=12, blob=b"auto"), "does not match"),
    "external missing": (lambda tmp: _external(tmp, "absent.bin"), "no such file"),
    "raw_data short": (_tensor_case(_raw), "raw_data"),
    "absurd dims": (_tensor_case(_dims), "elements"),
    "negative dim": (_tensor_case(_negative), "not a tensor shape"),
    "typed data short": (_tensor_case(_typed), "holds"),
    "truncated": (_truncated, "onnx model"),
    "random bytes": (_write(np.random.default_rng(0).bytes(4096)), "onnx model"),
    "zip named onnx": (_write(b"PK\x03\x04" + b"\0" * 200), "onnx model"),
    "empty": (_write(b""), "empty"),
    "old opset": (_old_opset, "older than"),
}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_onnx_is_one_line_and_exit_2(name, tmp_path):
    make, expect = CASES[name]
    source = make(tmp_path)
    before_files = sorted(p.name for p in tmp_path.iterdir())
    digest = _digest(source)
    result = CliRunner().invoke(main, ["fuse", str(source), str(tmp_path / "out.onnx")])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1 and lines[0].startswith("bnstrip: error: "), lines
    assert expect.lower() in lines[0].lower(), lines[0]
    assert "traceback" not in result.stderr.lower() and not result.stdout.strip()
    assert sorted(p.name for p in tmp_path.iterdir()) == before_files
    assert _digest(source) == digest


def test_node_count_bomb_is_refused_before_parsing(tmp_path, monkeypatch):
    from bnstrip.onnxfold import load

    monkeypatch.setattr(load, "MAX_ONNX_NODES", 1)
    source = _write(samples.shared_weight().SerializeToString())(tmp_path)
    monkeypatch.setattr(onnx.ModelProto, "ParseFromString", lambda *a: pytest.fail("parsed before the bound"))
    result = CliRunner().invoke(main, ["fuse", str(source), str(tmp_path / "out.onnx")])
    assert result.exit_code == 2 and "declares" in result.stderr


def test_external_data_inside_the_folder_is_read_and_kept(tmp_path):
    source = _external(tmp_path, "data.bin", blob=b"auto")
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["fuse", str(source), str(out)])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out.onnx.data").is_file()
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
