"""Validate a safetensors header before anything is allocated, then read the tensors with plain reads.

The header is JSON that a stranger wrote: its length, tensor count, dtypes, shapes
and byte ranges are all claims.  Each is checked against the file's size before a
byte of tensor data is allocated.  The data is then read with ordinary reads into
tensors of the validated sizes, not memory-mapped: a file truncated while we read
it gives a short read (a clean error), where a mapping would kill the process with
SIGBUS.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from bnstrip.errors import InputError, first_line, printable
from bnstrip.io.limits import MAX_TENSORS

FORMAT_MAX_HEADER = 100_000_000
"""The safetensors library's own header limit; a larger claim is hostile or broken."""
MAX_HEADER = 16 << 20
"""bnstrip's limit: a real header takes 100-200 bytes per tensor, so 16 MiB is room for MAX_TENSORS with margin."""
MAX_DIM = (1 << 63) - 1
"""torch sizes are int64: a dimension (or an element count, even of an empty tensor) past it cannot be a tensor."""
BYTES_PER_EXTRA_TENSOR = 256
"""Past the first 1,024 tensors, each must be paid for by 256 bytes of file: real tensors average kilobytes, while
empty ones declared by the hundred thousand cost seconds of parsing and a Python object each."""


@dataclass(frozen=True)
class SafetensorsEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class SafetensorsLayout:
    tensors: dict[str, SafetensorsEntry]
    metadata: dict[str, str]
    data_start: int


def torch_dtypes() -> dict[str, Any]:
    """safetensors' own dtype names -> torch dtypes (the library's table; it lacks none torch can hold)."""
    from safetensors.torch import _TYPES  # the mapping safetensors.torch itself loads with

    return dict(_TYPES)


def validate_safetensors(f: BinaryIO, size: int, path: Path) -> SafetensorsLayout:
    """Check the header the way the format requires (see the module doc); InputError naming the tensor otherwise.

    Header length within the file and under MAX_HEADER; at most MAX_TENSORS entries; dims and counts within int64;
    valid UTF-8 JSON object with no repeated keys; dtypes torch can hold; each range
    exactly numel * itemsize; ranges back to back from 0 to the end of the file.
    """
    shown = printable(path)
    if size < 8:
        raise InputError(f"{shown}: safetensors file is {size} bytes, shorter than its 8-byte header length; re-download it")
    f.seek(0)
    header_len = int.from_bytes(f.read(8), "little")
    if header_len > size - 8:
        raise InputError(f"{shown}: safetensors header claims {header_len:,} bytes but the file has {size:,} (truncated or crafted); re-download it")
    if header_len > MAX_HEADER:
        raise InputError(f"{shown}: safetensors header is {header_len:,} bytes, over bnstrip's {MAX_HEADER:,}-byte limit "
                         "; the file is crafted or corrupt, re-export it")
    raw = f.read(header_len)
    claimed = raw.count(b'"data_offsets"')
    limit = min(MAX_TENSORS, 1024 + size // BYTES_PER_EXTRA_TENSOR)
    if claimed > limit:
        raise InputError(f"{shown}: safetensors header lists {claimed:,} tensors, over bnstrip's limit of {limit:,} for a "
                         f"{size:,}-byte file; the file is crafted or corrupt, re-export it")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{shown}: safetensors header is not valid JSON ({first_line(exc, 200)}); the file is corrupt, re-download it") from None
    if not isinstance(header, dict):
        raise InputError(f"{shown}: safetensors header is not a JSON object; the file is corrupt, re-download it")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputError(f"{shown}: safetensors __metadata__ must map strings to strings; the file is corrupt, re-export it")
    data_start = 8 + header_len
    data_len = size - data_start
    dtypes = torch_dtypes()
    tensors = {name: _entry(name, info, dtypes, path) for name, info in header.items()}
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin < position:
            raise InputError(f"{shown}: tensor {printable(repr(name))} overlaps the tensor before it (bytes {entry.begin}..{entry.end}); "
                             "the file is corrupt or crafted, re-export it")
        if entry.begin > position:
            raise InputError(f"{shown}: {entry.begin - position} unused bytes before tensor {printable(repr(name))} (a gap in the data); "
                             "the file is corrupt, re-export it")
        position = entry.end
    if position > data_len:
        raise InputError(f"{shown}: tensor data needs {position:,} bytes but the file holds {data_len:,} (truncated); re-download it")
    if position < data_len:
        raise InputError(f"{shown}: {data_len - position:,} trailing bytes after the last tensor; the file is corrupt or was "
                         "appended to, re-export it")
    return SafetensorsLayout(tensors=tensors, metadata=dict(metadata), data_start=data_start)


def _entry(name: str, info: object, dtypes: dict[str, Any], path: Path) -> SafetensorsEntry:
    shown, key = printable(path), printable(repr(name))
    if not isinstance(info, dict):
        raise InputError(f"{shown}: safetensors entry {key} is not an object; the file is corrupt, re-export it")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in dtypes:
        known = ", ".join(sorted(dtypes))
        raise InputError(f"{shown}: tensor {key} has dtype {printable(repr(dtype))}, which this torch cannot hold "
                         f"(known: {known}); re-export it as F32/F16/BF16")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise InputError(f"{shown}: tensor {key} has an invalid shape {printable(repr(shape))[:80]}; the file is corrupt, re-export it")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise InputError(f"{shown}: tensor {key} has invalid data_offsets {printable(repr(offsets))[:80]}; the file is corrupt, re-export it")
    if any(d > MAX_DIM for d in shape):
        raise InputError(f"{shown}: tensor {key} has a dimension over {MAX_DIM:,} ({printable(repr(shape))[:80]}), more than "
                         "torch can index; the file is crafted or corrupt, re-export it")
    numel = 1
    for d in shape:
        numel *= d
    if numel > MAX_DIM:
        raise InputError(f"{shown}: tensor {key} claims {numel:,} elements, more than torch can index; the file is "
                         "crafted or corrupt, re-export it")
    expected = numel * dtypes[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        raise InputError(f"{shown}: tensor {key} {dtype}{shape} needs {expected:,} bytes but its range holds "
                         f"{offsets[1] - offsets[0]:,}; the file is corrupt, re-export it")
    return SafetensorsEntry(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def read_tensors(f: BinaryIO, layout: SafetensorsLayout, path: Path) -> dict[str, Any]:
    """Each tensor read into its own buffer of the validated size, in header order (no memory map)."""
    import torch

    dtypes = torch_dtypes()
    stream = cast(io.BufferedIOBase, f)  # open_regular_file's os.fdopen(fd, "rb"); typeshed's BinaryIO has no readinto
    tensors: dict[str, Any] = {}
    for name, entry in layout.tensors.items():
        nbytes = entry.end - entry.begin
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            f.seek(layout.data_start + entry.begin)
            got = stream.readinto(buffer.numpy().data)  # .data: the array's memoryview (numpy types its buffer protocol from 3.12)
            if got != nbytes:
                raise InputError(f"{printable(path)}: file ended while tensor {printable(repr(name))} was read (it was truncated "
                                 "while bnstrip read it); try again when nothing is writing the file")
        tensors[name] = buffer.view(dtypes[entry.dtype]).reshape(entry.shape)
    return tensors
