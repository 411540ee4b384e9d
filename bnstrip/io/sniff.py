"""Open an input only if it is a regular file, and tell its format from its first bytes (never its name).

A FIFO would block open(), `/dev/zero` never ends, a symlink loop never resolves:
each is refused by name before anything is read.  The format comes from the bytes,
so a zip named `.safetensors` is loaded as torch, and the reverse.
"""
from __future__ import annotations

import errno
import os
import pickletools
import stat
from pathlib import Path
from typing import IO, BinaryIO, cast

from bnstrip.errors import InputError, printable
from bnstrip.io.pickle_scan import BoundedReader

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
LFS_POINTER_PREFIX = b"version https://git-lfs"


def os_error(path: str | os.PathLike[str], exc: OSError, doing: str) -> InputError:
    """One line for an OSError on `path`, with the fix that goes with its errno."""
    shown = printable(path)
    if exc.errno == errno.ENOENT:
        return InputError(f"{shown}: no such file; check the path")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return InputError(f"{shown}: permission denied; make the file readable")
    if exc.errno == errno.ELOOP:
        return InputError(f"{shown}: is a symbolic link loop (too many levels of links); point it at the real file")
    if exc.errno == errno.ENAMETOOLONG:
        return InputError(f"{shown}: the path or a name in it is too long; use a shorter path")
    if exc.errno == errno.ENOTDIR:
        return InputError(f"{shown}: a part of the path is not a directory; check the path")
    return InputError(f"{shown}: cannot {doing} ({exc.strerror or exc}); check the path")


def open_regular_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Open `path` for reading only if it is a regular file.

    The type is checked with stat() before opening (a FIFO would block open(), a
    device like /dev/zero never ends) and again with fstat() on the descriptor,
    so a file swapped in between is caught too.
    """
    path = Path(path)
    try:
        before = os.stat(path)
    except OSError as exc:
        raise os_error(path, exc, "stat") from None
    _require_regular(before.st_mode, path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise os_error(path, exc, "open") from None
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
        raise InputError(f"{printable(path)}: is a directory; pass the checkpoint file inside it")
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise InputError(f"{printable(path)}: is {kind}, not a regular file; pass a .pt or .safetensors checkpoint file")


def describe_non_checkpoint(head: bytes, path: Path) -> InputError:
    """The most helpful refusal for bytes that are not a checkpoint (LFS pointer, HTML page, text, noise)."""
    shown = printable(path)
    stripped = head.lstrip()
    lowered = stripped[:64].lower()
    if stripped.startswith(LFS_POINTER_PREFIX):
        return InputError(f"{shown}: is a git-LFS pointer file, not the checkpoint; run `git lfs pull` to fetch the real file")
    if lowered.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<body")):
        return InputError(f"{shown}: is an HTML/XML page, not a checkpoint (a download saved an error or login page?); download the file itself")
    if head.startswith(EMPTY_ZIP_MAGIC):
        return InputError(f"{shown}: is an empty zip archive, not a checkpoint; re-export it with torch.save")
    if stripped[:1] in (b"{", b"["):
        return InputError(f"{shown}: is a JSON/text file, not a checkpoint; pass the .pt or .safetensors file")
    return InputError(f"{shown}: not a PyTorch (.pt) or safetensors checkpoint (unrecognised first bytes {head[:8].hex()}); "
                      "pass a file written by torch.save or safetensors")


ONNX_SECOND_FIELDS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72})
"""Tags of the ModelProto fields that follow ir_version in a serialised model (producer, domain, graph, opsets...)."""


def looks_like_onnx(head: bytes) -> bool:
    """A serialised ONNX ModelProto: field 1 (ir_version, a small varint) first, then another ModelProto field."""
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 64 and head[2] in ONNX_SECOND_FIELDS


def is_onnx_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a regular file whose first bytes are an ONNX model (False for anything unreadable)."""
    try:
        with open_regular_file(path) as f:
            return looks_like_onnx(f.read(8))
    except (InputError, OSError):
        return False


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
        # genops only calls read/readline/tell, which BoundedReader has; typeshed asks for a whole IO[bytes]
        for _ in pickletools.genops(cast(IO[bytes], BoundedReader(f, size))):
            pass
    except Exception:  # noqa: BLE001 - anything malformed simply is not a pickle
        return False
    return True


def detect(f: BinaryIO, size: int, path: Path) -> str:
    """'torch-zip', 'torch-legacy' (any pickle) or 'safetensors' from the first bytes; InputError otherwise."""
    if size == 0:
        raise InputError(f"{printable(path)}: file is empty; re-export or re-download the checkpoint")
    f.seek(0)
    head = f.read(64)
    if head.startswith(ZIP_MAGIC):
        return "torch-zip"
    if looks_like_safetensors(head) and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"  # before the pickle test: a header length of 128..1535 starts with b"\x80\x00".."\x05"
    if looks_like_pickle(head):
        return "torch-legacy"
    if looks_like_safetensors(head):
        return "safetensors"
    if parses_as_pickle(f, size):  # protocol 0/1 pickles have no PROTO opcode; they are still scanned, never run
        return "torch-legacy"
    raise describe_non_checkpoint(head, path)
