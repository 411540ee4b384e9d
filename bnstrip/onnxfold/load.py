"""Read an `.onnx` file as untrusted input: bounds on the wire first, then every tensor checked against its bytes.

Order: the file must be a regular file under MAX_ONNX_BYTES; its top-level protobuf fields
are walked without parsing (`wire_counts`) so a graph declaring millions of nodes or
initializers is refused before protobuf builds them; then it is parsed, and every tensor
(initializers, Constant attributes, subgraphs) must have sane dims and exactly the bytes its
shape and type declare. External data is read only from files in the model's own folder
(no absolute paths, no `..`, no symlink out of it, offset and length within the file) and
embedded, so what later reaches onnxruntime is the model bnstrip itself serialises.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnstrip.errors import InputError, printable
from bnstrip.io.limits import (
    MAX_ONNX_BYTES,
    MAX_ONNX_INITIALIZERS,
    MAX_ONNX_NODES,
    MAX_TENSOR_ELEMENTS,
    MAX_TENSOR_RANK,
)

MIN_OPSET = 7
"""BatchNormalization-7 is the oldest one onnxruntime runs; its `spatial` attribute (1 = per channel) is honoured."""
GRAPH_FIELD, NODE_FIELD, INITIALIZER_FIELD = 7, 1, 5


@dataclass
class LoadedOnnx:
    """A parsed, checked model with its external data embedded."""

    model: Any
    path: str
    sha256: str
    external: bool = False
    """Whether the file kept tensors in external data (the output then does too)."""
    notes: list[str] = field(default_factory=list)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, payload start, payload end) of one protobuf message, without building anything."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, after = _varint(data, pos)
            yield number, wire, pos, after
        elif wire == 1:
            after = pos + 8
            yield number, wire, pos, after
        elif wire == 2:
            length, pos = _varint(data, pos)
            after = pos + length
            yield number, wire, pos, after
        elif wire == 5:
            after = pos + 4
            yield number, wire, pos, after
        else:
            raise ValueError(f"wire type {wire}")
        if after > end:
            raise ValueError("a field runs past its message")
        pos = after


def wire_counts(data: bytes) -> tuple[int, int]:
    """(nodes, initializers) of the main graph, counted on the wire; ValueError if the bytes are not a protobuf."""
    nodes = inits = 0
    graphs = 0
    for number, wire, start, end in _fields(data, 0, len(data)):
        if number == GRAPH_FIELD and wire == 2:
            graphs += 1
            for inner, inner_wire, _, _ in _fields(data, start, end):
                nodes += inner == NODE_FIELD and inner_wire == 2
                inits += inner == INITIALIZER_FIELD and inner_wire == 2
    if graphs == 0:
        raise ValueError("no graph")
    return nodes, inits


def read_bounded(path: str | os.PathLike[str]) -> bytes:
    """The file's bytes, if it is a regular file of at most MAX_ONNX_BYTES."""
    from bnstrip.io.sniff import open_regular_file

    with open_regular_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise InputError(f"{printable(path)}: file is empty; re-export the ONNX model")
        if size > MAX_ONNX_BYTES:
            raise InputError(f"{printable(path)}: {size:,} bytes, over the {MAX_ONNX_BYTES:,}-byte protobuf limit; "
                             "save the model with external data (onnx.save(..., save_as_external_data=True))")
        return f.read(size)


def parse_model(data: bytes, shown: str) -> Any:
    """A ModelProto from bytes, after the wire-level bounds; one InputError for anything malformed."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        nodes, inits = wire_counts(data)
    except ValueError as exc:
        raise InputError(f"{shown}: not an ONNX model (protobuf structure: {exc}); pass a file written by onnx.save "
                         "or torch.onnx.export") from None
    if nodes > MAX_ONNX_NODES or inits > MAX_ONNX_INITIALIZERS:
        raise InputError(f"{shown}: the graph declares {nodes:,} nodes and {inits:,} initializers (limits "
                         f"{MAX_ONNX_NODES:,} and {MAX_ONNX_INITIALIZERS:,}); not a model bnstrip can fold")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RecursionError, ValueError) as exc:
        raise InputError(f"{shown}: not a valid ONNX model ({printable(str(exc))[:120] or 'protobuf decode error'}); "
                         "re-export it") from None
    return model


def iter_graphs(graph: Any) -> Iterator[Any]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from iter_graphs(attr.g)
            for sub in attr.graphs:
                yield from iter_graphs(sub)


def iter_tensors(model: Any) -> Iterator[tuple[str, Any]]:
    """(where, TensorProto) for every tensor a model holds: initializers, sparse ones, node attributes."""
    for graph in iter_graphs(model.graph):
        for tensor in graph.initializer:
            yield f"initializer {tensor.name}", tensor
        for sparse in graph.sparse_initializer:
            yield f"sparse initializer {sparse.values.name}", sparse.values
            yield f"sparse initializer {sparse.values.name} indices", sparse.indices
        for node in graph.node:
            for attr in node.attribute:
                where = f"node {node.name or node.op_type} attribute {attr.name}"
                if attr.HasField("t"):
                    yield where, attr.t
                for tensor in attr.tensors:
                    yield where, tensor


def element_bytes(data_type: int, count: int) -> int | None:
    """Bytes `count` elements of `data_type` take in raw_data (None for strings, which have no raw form)."""
    import onnx

    if data_type == onnx.TensorProto.STRING:
        return None
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(data_type)
    bits = 4 if data_type in _FOUR_BIT_TYPES() else np_dtype.itemsize * 8
    return (count * bits + 7) // 8


def _FOUR_BIT_TYPES() -> set[int]:
    import onnx

    return {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, name)}


def _typed_count(tensor: Any) -> int:
    return sum(len(getattr(tensor, name)) for name in ("float_data", "int32_data", "string_data", "int64_data",
                                                       "double_data", "uint64_data"))


def check_tensor(tensor: Any, where: str, shown: str) -> int:
    """Refuse absurd dims, unknown types and data that is not exactly what the shape declares; returns elements."""
    import onnx

    label = f"{shown}: {printable(where)}"
    dims = list(tensor.dims)
    if len(dims) > MAX_TENSOR_RANK or any(d < 0 for d in dims):
        raise InputError(f"{label}: dims {printable(dims[:8])} are not a tensor shape; the file is corrupt")
    count = math.prod(dims)
    if count > MAX_TENSOR_ELEMENTS:
        raise InputError(f"{label}: declares {count:,} elements (over {MAX_TENSOR_ELEMENTS:,}); the file is corrupt")
    try:
        expected = element_bytes(tensor.data_type, count)
    except (KeyError, ValueError, TypeError):
        raise InputError(f"{label}: unknown data type {tensor.data_type}; the file is corrupt") from None
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return count
    if tensor.HasField("raw_data"):
        if expected is not None and len(tensor.raw_data) != expected:
            raise InputError(f"{label}: raw_data has {len(tensor.raw_data):,} bytes but shape {dims} of its type "
                             f"needs {expected:,}; the file is corrupt")
        return count
    typed = _typed_count(tensor)
    complex_types = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
    wanted = {2 * count} if tensor.data_type in complex_types else {count, (count + 1) // 2}
    if typed not in wanted:
        raise InputError(f"{label}: holds {typed:,} values but shape {dims} declares {count:,}; the file is corrupt")
    return count


def _external_fields(tensor: Any) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def embed_external(tensor: Any, base: Path, shown: str, where: str) -> int:
    """Read one tensor's external bytes (checked: folder, offset, length, size) into raw_data; returns bytes read."""
    import onnx

    from bnstrip.io.sniff import open_regular_file

    label = f"{shown}: {printable(where)}"
    info = _external_fields(tensor)
    location = info.get("location", "")
    rel = Path(location)
    if not location or rel.is_absolute() or ".." in rel.parts or "\\" in location or "\x00" in location:
        raise InputError(f"{label}: external data location {printable(location)[:80]!r} is not a file name inside "
                         "the model's folder; keep the data file beside the model")
    root = base.resolve()
    target = (base / rel)
    if not target.resolve().is_relative_to(root):
        raise InputError(f"{label}: external data {printable(location)[:80]!r} resolves outside the model's folder "
                         "(a symbolic link?); keep the data file beside the model")
    try:
        offset, length = int(info.get("offset", "0")), int(info["length"]) if "length" in info else None
    except ValueError:
        raise InputError(f"{label}: external data offset/length are not integers; the file is corrupt") from None
    expected = element_bytes(tensor.data_type, math.prod(tensor.dims))
    length = expected if length is None else length
    if offset < 0 or length is None or length != expected:
        raise InputError(f"{label}: external data length {length} does not match shape {list(tensor.dims)} "
                         f"({expected} bytes); the file is corrupt")
    with open_regular_file(target) as f:
        size = os.fstat(f.fileno()).st_size
        if offset + length > size:
            raise InputError(f"{label}: external data asks for bytes {offset:,}..{offset + length:,} of "
                             f"{printable(location)[:80]}, which has {size:,}; the data file is truncated or wrong")
        f.seek(offset)
        tensor.raw_data = f.read(length)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    return length


def check_model(model: Any, shown: str, base: Path | None) -> bool:
    """Every tensor checked (external ones read from `base`); opsets in range; True if any data was external."""
    import onnx

    external = 0
    for where, tensor in iter_tensors(model):
        check_tensor(tensor, where, shown)
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            if base is None:
                raise InputError(f"{shown}: {printable(where)} keeps its data in an external file, and a model given "
                                 "in memory has no folder to read it from; pass the model's path instead")
            external += embed_external(tensor, base, shown, where)
            if external > MAX_ONNX_BYTES:
                raise InputError(f"{shown}: external data over {MAX_ONNX_BYTES:,} bytes; not a model bnstrip can fold")
    opset = default_opset(model)
    if opset is None or opset < MIN_OPSET:
        raise InputError(f"{shown}: opset {opset} of the default domain is older than {MIN_OPSET}; upgrade it with "
                         "onnx.version_converter first")
    return external > 0


def default_opset(model: Any) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def load_onnx(source: Any) -> LoadedOnnx:
    """A checked ModelProto from a path or a ModelProto (which is copied; the caller's object is never changed)."""
    import hashlib

    import onnx

    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        external = check_model(model, "model", None)
        return LoadedOnnx(model, "model", hashlib.sha256(model.SerializeToString()).hexdigest(), external)
    shown = printable(source)
    data = read_bounded(source)
    model = parse_model(data, shown)
    external = check_model(model, shown, Path(source).parent)
    return LoadedOnnx(model, str(source), hashlib.sha256(data).hexdigest(), external)
