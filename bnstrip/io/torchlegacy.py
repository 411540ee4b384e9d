"""Check a legacy (pre-zip) torch.save file's storages against its raw bytes before torch allocates them.

The legacy format is five pickles (magic number, protocol, sys_info, the object,
the list of storage keys) and then, for each listed key in order, an 8-byte element
count and the storage's bytes.  torch allocates every storage the object pickle
names and fills only the listed ones, so a storage left out of the list would be
written out as uninitialised memory; a count larger than the file would be a huge
allocation.  Both are refused here, statically.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from bnstrip.errors import InputError, printable
from bnstrip.io.limits import MAX_TENSORS
from bnstrip.io.pickle_scan import TORCH_LEGACY_MAGIC, Global, PickleScan, is_storage_class, storage_itemsizes


def _refuse(path: Path, what: str) -> InputError:
    return InputError(f"{printable(path)}: {what}; the file is truncated, corrupt or crafted, re-export it with "
                      "torch.save(model.state_dict(), PATH)")


def is_torch_legacy(scans: list[PickleScan]) -> bool:
    return bool(scans) and scans[0].value == TORCH_LEGACY_MAGIC


def check_legacy_storages(f: BinaryIO, scans: list[PickleScan], raw_start: int, size: int, path: Path) -> None:
    """Every storage named by the object pickle is listed, and every listed one is backed by exactly its bytes."""
    if len(scans) < 5:
        raise _refuse(path, "legacy torch file ends before its list of storages")
    storages = _named_storages(scans[3].persids, path)
    keys = scans[4].value
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise _refuse(path, "legacy torch file's storage list is not a list of names")
    listed = set(keys)
    missing = sorted(set(storages) - listed)
    if missing:
        raise _refuse(path, f"storage {printable(missing[0])} is used by a tensor but its bytes are not in the file "
                            "(it would be uninitialised memory)")
    unknown = sorted(listed - set(storages))
    if unknown or len(listed) != len(keys):
        raise _refuse(path, f"storage list names {printable((unknown or keys)[0])} which no tensor uses, or names one twice")
    position = raw_start
    for key in keys:
        numel, itemsize = storages[key]
        f.seek(position)
        header = f.read(8)
        if len(header) < 8:
            raise _refuse(path, f"storage {printable(key)} is missing from the end of the file")
        (count,) = struct.unpack("<q", header)
        if count != numel:
            raise _refuse(path, f"storage {printable(key)} holds {count:,} elements but its tensor needs {numel:,}")
        position += 8 + numel * itemsize
        if position > size:
            raise _refuse(path, f"storage {printable(key)} needs {numel * itemsize:,} bytes past the end of the file")


def _named_storages(persids: list[Any], path: Path) -> dict[str, tuple[int, int]]:
    """root key -> (elements, element size) for every ('storage', type, key, location, numel, view) persistent id."""
    if len(persids) > MAX_TENSORS:
        raise _refuse(path, f"the pickle names {len(persids):,} storages, over bnstrip's limit of {MAX_TENSORS:,}")
    sizes = storage_itemsizes()
    storages: dict[str, tuple[int, int]] = {}
    for pid in persids:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] in ("storage", b"storage")):
            raise _refuse(path, f"the pickle has a persistent id {printable(repr(pid))[:80]} that is not a storage")
        _, kind, key, _, numel, view = pid
        name = kind.name if isinstance(kind, Global) else None
        if name is None or not is_storage_class(name) or name not in sizes:
            raise _refuse(path, f"storage {printable(repr(key))[:60]} has no known storage type")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise _refuse(path, f"storage {printable(repr(key))[:60]} has a malformed key or size")
        if storages.setdefault(key, (numel, sizes[name])) != (numel, sizes[name]):
            raise _refuse(path, f"storage {printable(key)} is named twice with different sizes")
        if view is not None:
            ok = (isinstance(view, tuple) and len(view) == 3 and all(type(v) is int for v in view[1:])
                  and 0 <= view[1] and 0 <= view[2] and view[1] + view[2] <= numel)
            if not ok:
                raise _refuse(path, f"storage {printable(key)} has a view outside its bytes")
    return storages
