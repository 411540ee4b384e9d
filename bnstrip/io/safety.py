"""Structural checks that run before any checkpoint bytes reach torch or safetensors.

Checkpoints come from strangers: a pickle can name any Python callable, a zip
can promise gigabytes it does not hold, a safetensors header can claim 2**63
bytes.  Everything here reads the file through one already-open descriptor,
never executes anything from it, and raises InputError with a one-line message
(file, what is wrong, what to do).  torch is imported lazily and only for its
list of weights-only globals.
"""
from __future__ import annotations

import io
import json
import os
import pickletools
import stat
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable

from bnstrip.errors import InputError, first_line

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
LFS_POINTER_PREFIX = b"version https://git-lfs"
SAFETENSORS_MAX_HEADER = 100_000_000
"""The safetensors library's own header limit; a larger claim is hostile or broken."""

SAFETENSORS_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
"""safetensors dtypes that map onto a torch dtype, with their element size in bytes."""

PICKLE_SCAN_LIMIT = 5
"""A legacy torch.save file is five pickles (magic, protocol, sys_info, object, storage keys) then raw bytes."""


# --------------------------------------------------------------------------- opening


def open_regular_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Open `path` for reading only if it is a regular file.

    The type is checked with stat() before opening (a FIFO would block open(), a
    device like /dev/zero never ends) and again with fstat() on the descriptor,
    so a file swapped in between is caught too.
    """
    path = Path(path)
    try:
        before = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; check the path") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied; make the file readable") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot stat ({exc.strerror or exc}); check the path") from None
    _require_regular(before.st_mode, path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise InputError(f"{path}: permission denied; make the file readable") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot open ({exc.strerror or exc}); check the path") from None
    try:
        _require_regular(os.fstat(fd).st_mode, path)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _require_regular(mode: int, path: Path) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise InputError(f"{path}: is a directory; pass the checkpoint file inside it")
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise InputError(f"{path}: is {kind}, not a regular file; pass a .pt or .safetensors checkpoint file")


# --------------------------------------------------------------------------- what the first bytes say


def describe_non_checkpoint(head: bytes, path: Path) -> InputError:
    """The most helpful refusal for bytes that are not a checkpoint (LFS pointer, HTML page, text, noise)."""
    stripped = head.lstrip()
    lowered = stripped[:64].lower()
    if stripped.startswith(LFS_POINTER_PREFIX):
        return InputError(f"{path}: is a git-LFS pointer file, not the checkpoint; run `git lfs pull` to fetch the real file")
    if lowered.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<body")):
        return InputError(f"{path}: is an HTML/XML page, not a checkpoint (a download saved an error or login page?); download the file itself")
    if head.startswith(EMPTY_ZIP_MAGIC):
        return InputError(f"{path}: is an empty zip archive, not a checkpoint; re-export it with torch.save")
    if stripped[:1] in (b"{", b"["):
        return InputError(f"{path}: is a JSON/text file, not a checkpoint; pass the .pt or .safetensors file")
    return InputError(f"{path}: not a PyTorch (.pt) or safetensors checkpoint (unrecognised first bytes {head[:8].hex()}); "
                      "pass a file written by torch.save or safetensors")


def looks_like_safetensors(head: bytes) -> bool:
    """8-byte little-endian header length followed by a JSON object."""
    return len(head) >= 9 and head[8:9] == b"{"


def looks_like_pickle(head: bytes) -> bool:
    """Protocol 2+ pickles (and every torch.save legacy file) start with PROTO; protocol 0/1 need `parses_as_pickle`."""
    return len(head) >= 2 and head[:1] == b"\x80" and head[1] <= 5


def parses_as_pickle(f: BinaryIO, size: int) -> bool:
    """True when the stream is a complete old-protocol pickle (statically: nothing runs)."""
    f.seek(0)
    try:
        for _ in pickletools.genops(_BoundedReader(f, size)):
            pass
    except Exception:  # noqa: BLE001 - anything malformed simply is not a pickle
        return False
    return True


# --------------------------------------------------------------------------- pickles


class _BoundedReader:
    """A read-only view whose read(n) never asks for more than the file holds (a pickle may claim 2**63 bytes)."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self._size = size

    def read(self, n: int = -1) -> bytes:
        remaining = max(0, self._size - self._f.tell())
        return self._f.read(remaining if n is None or n < 0 else min(n, remaining))

    def readline(self) -> bytes:
        remaining = max(0, self._size - self._f.tell())
        return self._f.readline(min(remaining, 1 << 16))

    def tell(self) -> int:
        return self._f.tell()


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_NO_PUSH_OPS = {"PROTO", "FRAME", "STOP", "POP", "POP_MARK"}


def pickle_globals(stream: io.BufferedIOBase | _BoundedReader, max_pickles: int = 1) -> list[str]:
    """Every callable/class a pickle would look up, found by reading opcodes (pickletools), never by unpickling.

    Handles GLOBAL/INST (protocols 0-3) and STACK_GLOBAL (4+), resolving its two
    string operands through the memo; an operand it cannot resolve, or an
    extension-registry code, is reported as such so the caller refuses it.
    """
    found: list[str] = []
    for index in range(max_pickles):
        pushed: list[str | None] = []
        memo: dict[int, str | None] = {}
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                name = opcode.name
                if name in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    found.append(f"{module}.{attr}")
                    pushed.append(None)
                elif name == "STACK_GLOBAL":
                    module, attr = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
                    found.append(f"{module}.{attr}" if isinstance(module, str) and isinstance(attr, str)
                                 else "<a global whose name is computed at load time>")
                    pushed.append(None)
                elif name.startswith("EXT"):
                    found.append(f"<copyreg extension code {arg}>")
                    pushed.append(None)
                elif name in _STRING_OPS:
                    pushed.append(arg if isinstance(arg, str) else None)
                elif name in _PUT_OPS:
                    memo[int(arg)] = pushed[-1] if pushed else None
                elif name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif name in _GET_OPS:
                    pushed.append(memo.get(int(arg)))
                elif name not in _NO_PUSH_OPS:
                    pushed.append(None)
        except ValueError:
            if index == 0:
                raise
            break  # past the last pickle of a legacy file: raw storage bytes follow
    return found


def allowed_globals() -> set[str]:
    """What torch's weights-only unpickler admits by default (the same set get_unsafe_globals_in_checkpoint uses)."""
    from torch import _weights_only_unpickler as wou

    return set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals())


def unsafe_globals(names: Iterable[str]) -> list[str]:
    """The names torch's weights-only set does not admit, sorted, without repeats."""
    allowed = allowed_globals()
    return sorted({n for n in names if n not in allowed})


def refuse_globals(path: Path, names: list[str]) -> InputError:
    """The one-line refusal for a pickle that names code; never suggests allow-listing anything."""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return InputError(
        f"{path}: refused: the pickle calls {shown}, which is code, not tensor data (nothing was run); "
        "ask for a plain state_dict (torch.save(model.state_dict())) or a .safetensors file from a source you trust"
    )


def scan_zip_pickle(f: BinaryIO, layout: "ZipLayout", path: Path) -> list[str]:
    """Forbidden globals of `<archive>/data.pkl`: torch's static scan, plus ours for opcodes it does not parse."""
    import torch

    found: set[str] = set()
    f.seek(0)
    try:
        found.update(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    except Exception:  # noqa: BLE001 - torch's scanner knows only protocol-2 opcodes; ours covers the rest
        pass
    record = layout.records[layout.pickle_name]
    f.seek(record.data_start)
    data = f.read(record.size)
    try:
        found.update(pickle_globals(io.BytesIO(data)))
    except ValueError as exc:
        raise InputError(f"{path}: {layout.pickle_name} is not a valid pickle ({first_line(exc, 200)}); the file is corrupt, re-export it") from None
    return unsafe_globals(found)


def scan_legacy_pickles(f: BinaryIO, size: int, path: Path) -> list[str]:
    """Forbidden globals in the leading pickles of a legacy torch.save file or a bare pickle."""
    f.seek(0)
    try:
        names = pickle_globals(_BoundedReader(f, size), max_pickles=PICKLE_SCAN_LIMIT)
    except ValueError as exc:
        raise InputError(f"{path}: corrupt pickle ({first_line(exc, 200)}); re-export the checkpoint with torch.save") from None
    return unsafe_globals(names)


# --------------------------------------------------------------------------- torch zip archives


@dataclass(frozen=True)
class ZipRecord:
    name: str
    size: int
    data_start: int


@dataclass
class ZipLayout:
    """Where each record's bytes are; `prefix` is the archive folder torch.save chose."""

    prefix: str
    records: dict[str, ZipRecord] = field(default_factory=dict)

    @property
    def pickle_name(self) -> str:
        return f"{self.prefix}/data.pkl"

    @property
    def is_torchscript(self) -> bool:
        return f"{self.prefix}/constants.pkl" in self.records or any(
            n.startswith(f"{self.prefix}/code/") for n in self.records)


def validate_torch_zip(f: BinaryIO, size: int, path: Path) -> ZipLayout:
    """Check a torch.save zip before torch opens it: stored records only, each inside the file, none overlapping.

    torch writes records uncompressed so it can mmap them; a compressed record is
    garbage under mmap and a zip bomb otherwise, and records that promise more
    bytes than the file holds (or share bytes) are the other zip-bomb shapes.
    """
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as archive:  # reads only the central directory; f stays open
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise InputError(f"{path}: truncated or corrupt zip archive ({first_line(exc, 200)}); re-download or re-export it") from None
    if not infos:
        raise InputError(f"{path}: zip archive holds no records; re-export it with torch.save")
    declared = sum(i.file_size for i in infos)
    if declared > size:
        raise InputError(f"{path}: records claim {declared:,} bytes but the file has {size:,} (a zip bomb or a corrupt file); "
                         "re-export it with torch.save")
    prefix = infos[0].filename.split("/", 1)[0]
    layout = ZipLayout(prefix=prefix)
    spans: list[tuple[int, int, str]] = []
    for info in infos:
        name = info.filename
        if info.flag_bits & 0x1:
            raise InputError(f"{path}: record {name} is encrypted; torch checkpoints never are, re-export it with torch.save")
        if info.compress_type != zipfile.ZIP_STORED:
            raise InputError(f"{path}: record {name} is compressed (method {info.compress_type}); torch.save stores records "
                             "uncompressed, so this archive was rebuilt by another tool; re-save it with torch.save")
        if info.compress_size != info.file_size:
            raise InputError(f"{path}: record {name} says {info.compress_size:,} stored but {info.file_size:,} bytes; the archive is corrupt, re-export it")
        data_start = _local_data_start(f, info, size, path)
        data_end = data_start + info.file_size
        if data_end > size:
            raise InputError(f"{path}: record {name} runs past the end of the file (truncated?); re-download or re-export it")
        if name in layout.records:
            raise InputError(f"{path}: record {name} appears twice; the archive is corrupt or crafted, re-export it")
        layout.records[name] = ZipRecord(name, info.file_size, data_start)
        spans.append((info.header_offset, data_end, name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise InputError(f"{path}: records {first} and {second} share bytes (a zip bomb or a corrupt file); re-export it with torch.save")
    if layout.pickle_name not in layout.records and not layout.is_torchscript:
        raise InputError(f"{path}: archive has no {layout.pickle_name}, so it holds no checkpoint (incomplete or not from torch.save); re-export it")
    return layout


def _local_data_start(f: BinaryIO, info: zipfile.ZipInfo, size: int, path: Path) -> int:
    """Offset of a record's bytes, from its local header (which must agree with the central directory)."""
    if info.header_offset + 30 > size:
        raise InputError(f"{path}: record {info.filename} starts past the end of the file (truncated?); re-download or re-export it")
    f.seek(info.header_offset)
    header = f.read(30)
    signature, _, _, method, _, _, _, _, _, name_len, extra_len = struct.unpack("<IHHHHHIIIHH", header)
    if signature != 0x04034B50:
        raise InputError(f"{path}: record {info.filename} has no local header where the directory says; the archive is corrupt, re-export it")
    if method != zipfile.ZIP_STORED:
        raise InputError(f"{path}: record {info.filename} is compressed (method {method}); re-save the checkpoint with torch.save")
    return info.header_offset + 30 + name_len + extra_len


# --------------------------------------------------------------------------- safetensors


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


def validate_safetensors(f: BinaryIO, size: int, path: Path) -> SafetensorsLayout:
    """Check the header the way the format requires, before the safetensors library sees the file.

    Header length within the file and under 100 MB; valid UTF-8 JSON object with
    no repeated keys; known dtypes; each tensor's byte range exactly
    numel * itemsize; ranges back to back from 0 to the end of the file (no gap,
    no overlap, no trailing bytes).
    """
    if size < 8:
        raise InputError(f"{path}: safetensors file is {size} bytes, shorter than its 8-byte header length; re-download it")
    f.seek(0)
    header_len = int.from_bytes(f.read(8), "little")
    if header_len > size - 8:
        raise InputError(f"{path}: safetensors header claims {header_len:,} bytes but the file has {size:,} (truncated or crafted); re-download it")
    if header_len > SAFETENSORS_MAX_HEADER:
        raise InputError(f"{path}: safetensors header is {header_len:,} bytes, over the format's 100 MB limit; the file is crafted or corrupt")
    raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: safetensors header is not valid JSON ({first_line(exc, 200)}); the file is corrupt, re-download it") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object; the file is corrupt, re-download it")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputError(f"{path}: safetensors __metadata__ must map strings to strings; the file is corrupt")
    data_start = 8 + header_len
    data_len = size - data_start
    tensors: dict[str, SafetensorsEntry] = {}
    for name, info in header.items():
        tensors[name] = _safetensors_entry(name, info, path)
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin < position:
            raise InputError(f"{path}: tensor {name!r} overlaps the tensor before it (bytes {entry.begin}..{entry.end}); the file is corrupt or crafted, re-export it")
        if entry.begin > position:
            raise InputError(f"{path}: {entry.begin - position} unused bytes before tensor {name!r} (a gap in the data); the file is corrupt, re-export it")
        position = entry.end
    if position > data_len:
        raise InputError(f"{path}: tensor data needs {position:,} bytes but the file holds {data_len:,} (truncated); re-download it")
    if position < data_len:
        raise InputError(f"{path}: {data_len - position:,} trailing bytes after the last tensor; the file is corrupt or was appended to, re-export it")
    return SafetensorsLayout(tensors=tensors, metadata=dict(metadata), data_start=data_start)


def _safetensors_entry(name: str, info: object, path: Path) -> SafetensorsEntry:
    if not isinstance(info, dict):
        raise InputError(f"{path}: safetensors entry {name!r} is not an object; the file is corrupt")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPE_SIZES:
        raise InputError(f"{path}: tensor {name!r} has dtype {dtype!r}, which bnstrip cannot read; re-export it as F32/F16/BF16")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise InputError(f"{path}: tensor {name!r} has an invalid shape {shape!r}; the file is corrupt")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise InputError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}; the file is corrupt")
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * SAFETENSORS_DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise InputError(f"{path}: tensor {name!r} {dtype}{shape} needs {expected:,} bytes but its range holds "
                         f"{offsets[1] - offsets[0]:,}; the file is corrupt, re-export it")
    return SafetensorsEntry(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


