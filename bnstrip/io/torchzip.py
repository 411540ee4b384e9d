"""Validate a torch.save zip archive the way torch's reader (miniz, PyTorchStreamReader) will read it.

Zip parsers disagree on crafted archives (two central directories, a zip64 record
that one parser reads where the other does not, prepended data), so this module
does not ask Python's zipfile: it parses the archive itself, from the end as miniz
does, and insists on the one layout torch.save writes.  End record exactly at the
end of the file (with its zip64 locator and record exactly before it when present),
one central directory ending where they begin, records stored (not compressed) back
to back from offset 0 up to the directory, each local header agreeing with its
central entry, no name twice.  Then every storage the pickle names must have its
`data/<key>` record holding exactly the bytes it needs, so torch never allocates a
storage the file does not fill.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from bnstrip.errors import InputError, first_line, printable
from bnstrip.io.limits import MAX_TENSORS
from bnstrip.io.pickle_scan import Global, PickleScan, is_storage_class, scan_pickle, storage_itemsizes

EOCD = struct.Struct("<IHHHHIIH")          # end of central directory, 22 bytes
ZIP64_LOCATOR = struct.Struct("<IIQI")      # 20 bytes
ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")   # 56 bytes
CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
LOCAL = struct.Struct("<IHHHHHIIIHH")       # 30 bytes
MAX_RECORDS = 1_000_000


@dataclass(frozen=True)
class ZipRecord:
    name: str
    size: int
    data_start: int


@dataclass
class ZipLayout:
    """Where each record's bytes are; `prefix` is the archive folder torch.save chose (torch takes the first name's)."""

    prefix: str
    records: dict[str, ZipRecord] = field(default_factory=dict)

    @property
    def pickle_name(self) -> str:
        return f"{self.prefix}/data.pkl"

    @property
    def is_torchscript(self) -> bool:
        return f"{self.prefix}/constants.pkl" in self.records or any(
            n.startswith(f"{self.prefix}/code/") for n in self.records)


def _bad(path: Path, what: str) -> InputError:
    return InputError(f"{printable(path)}: {what}; the archive is corrupt or crafted, re-export it with torch.save")


def _read_at(f: BinaryIO, offset: int, count: int) -> bytes:
    f.seek(offset)
    return f.read(count)


def _end_records(f: BinaryIO, size: int, path: Path) -> tuple[int, int, int]:
    """(entries, directory offset, directory end) from the end record(s), which must end the file exactly."""
    if size < EOCD.size + LOCAL.size:
        raise InputError(f"{printable(path)}: truncated or corrupt zip archive ({size} bytes); re-download or re-export it")
    sig, disk, cd_disk, on_disk, total, cd_size, cd_offset, comment = EOCD.unpack(_read_at(f, size - EOCD.size, EOCD.size))
    if sig != 0x06054B50 or comment != 0:
        raise InputError(f"{printable(path)}: truncated or corrupt zip archive (no end record at the end of the file, or "
                         "data after it); re-download or re-export it")
    if disk != 0 or cd_disk != 0 or on_disk != total:
        raise _bad(path, "zip archive spans several disks")
    end = size - EOCD.size
    locator_at = end - ZIP64_LOCATOR.size
    locator = _read_at(f, locator_at, ZIP64_LOCATOR.size) if locator_at >= 0 else b""
    if locator[:4] != b"PK\x06\x07":  # miniz and zipfile both look for the zip64 locator right before the end record
        if cd_offset + cd_size != end:
            raise _bad(path, "central directory does not end where the end record begins (prepended, appended or hidden data)")
        return total, cd_offset, end
    _, locator_disk, zip64_at, disks = ZIP64_LOCATOR.unpack(locator)
    if locator_disk != 0 or disks != 1 or zip64_at != locator_at - ZIP64_EOCD.size:
        raise _bad(path, "zip64 locator points somewhere other than the zip64 end record right before it")
    (sig64, record_size, _, _, disk64, cd_disk64, on_disk64, total64, cd_size64,
     cd_offset64) = ZIP64_EOCD.unpack(_read_at(f, zip64_at, ZIP64_EOCD.size))
    if sig64 != 0x06064B50 or record_size != ZIP64_EOCD.size - 12 or disk64 or cd_disk64 or on_disk64 != total64:
        raise _bad(path, "zip64 end record is malformed")
    for narrow, wide, mask in ((total, total64, 0xFFFF), (cd_size, cd_size64, 0xFFFFFFFF), (cd_offset, cd_offset64, 0xFFFFFFFF)):
        if narrow != mask and narrow != wide:
            raise _bad(path, "zip64 and classic end records disagree (two views of one archive)")
    if cd_offset64 + cd_size64 != zip64_at:
        raise _bad(path, "central directory does not end where the zip64 end record begins (prepended, appended or hidden data)")
    return total64, cd_offset64, zip64_at


@dataclass(frozen=True)
class _Entry:
    name: bytes
    flags: int
    method: int
    compressed: int
    size: int
    offset: int


def _zip64_extra(extra: bytes, size: int, compressed: int, offset: int) -> tuple[int, int, int]:
    """Apply a zip64 extended-information field (0x0001) to the 0xFFFFFFFF-marked values, in the order the spec gives."""
    position = 0
    while position + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, position)
        body = extra[position + 4: position + 4 + length]
        if tag == 0x0001:
            values = [v[0] for v in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
            if size == 0xFFFFFFFF and values:
                size = values.pop(0)
            if compressed == 0xFFFFFFFF and values:
                compressed = values.pop(0)
            if offset == 0xFFFFFFFF and values:
                offset = values.pop(0)
        position += 4 + length
    return size, compressed, offset


def _central_entries(f: BinaryIO, count: int, cd_offset: int, cd_end: int, path: Path) -> list[_Entry]:
    if count == 0:
        raise InputError(f"{printable(path)}: zip archive holds no records; re-export it with torch.save")
    if count > MAX_RECORDS or count * CENTRAL.size > cd_end - cd_offset:
        raise _bad(path, f"central directory claims {count:,} records in {cd_end - cd_offset:,} bytes")
    directory = _read_at(f, cd_offset, cd_end - cd_offset)
    entries: list[_Entry] = []
    position = 0
    for _ in range(count):
        if position + CENTRAL.size > len(directory):
            raise _bad(path, "central directory is shorter than its record count")
        (sig, _, _, flags, method, _, _, _, compressed, size, name_len, extra_len, comment_len, disk, _, _,
         offset) = CENTRAL.unpack_from(directory, position)
        if sig != 0x02014B50 or disk not in (0, 0xFFFF):
            raise _bad(path, "central directory entry is malformed")
        start = position + CENTRAL.size
        name = directory[start: start + name_len]
        extra = directory[start + name_len: start + name_len + extra_len]
        size, compressed, offset = _zip64_extra(extra, size, compressed, offset)
        entries.append(_Entry(name, flags, method, compressed, size, offset))
        position = start + name_len + extra_len + comment_len
    if position != len(directory):
        raise _bad(path, "central directory holds more bytes than its records")
    return entries


def _check_record(f: BinaryIO, entry: _Entry, expected_start: int, size: int, path: Path) -> tuple[int, int]:
    """Check one record sits at `expected_start` as its central entry says; (where its bytes start, where the next begins)."""
    shown = printable(entry.name.decode("utf-8", "replace"))
    if entry.flags & 0x1:
        raise InputError(f"{printable(path)}: record {shown} is encrypted; torch checkpoints never are, re-export it with torch.save")
    if entry.method != 0 or entry.compressed != entry.size:
        raise InputError(f"{printable(path)}: record {shown} is compressed (method {entry.method}); torch.save stores records "
                         "uncompressed, so this archive was rebuilt by another tool (or is a zip bomb); re-save it with torch.save")
    if entry.offset != expected_start:
        raise _bad(path, f"record {shown} starts at byte {entry.offset:,}, not right after the record before it "
                         "(records overlap, share bytes or hide data between them)")
    header = _read_at(f, entry.offset, LOCAL.size)
    if len(header) < LOCAL.size:
        raise InputError(f"{printable(path)}: record {shown} runs past the end of the file (truncated?); re-download or re-export it")
    sig, _, flags, method, _, _, _, compressed, local_size, name_len, extra_len = LOCAL.unpack(header)
    if sig != 0x04034B50 or method != entry.method or flags != entry.flags:
        raise _bad(path, f"record {shown}'s local header disagrees with the central directory")
    if _read_at(f, entry.offset + LOCAL.size, name_len) != entry.name:
        raise _bad(path, f"record {shown}'s local header names another file")
    if (compressed, local_size) not in ((0, 0), (entry.size, entry.size), (0xFFFFFFFF, 0xFFFFFFFF)):
        raise _bad(path, f"record {shown}'s local header gives another size")
    data_start = entry.offset + LOCAL.size + name_len + extra_len
    data_end = data_start + entry.size
    if flags & 0x8:  # a data descriptor follows the bytes (torch.save writes one, with its signature)
        descriptor = _read_at(f, data_end, 24)
        wide = entry.size >= 0xFFFFFFFF or (len(descriptor) >= 24 and struct.unpack_from("<Q", descriptor, 8)[0] == entry.size
                                              and struct.unpack_from("<Q", descriptor, 16)[0] == entry.size)
        length = 24 if wide else 16
        if descriptor[:4] != b"PK\x07\x08" or len(descriptor) < length:
            raise _bad(path, f"record {shown} has no data descriptor where its size says")
        data_end += length
    if data_end > size:
        raise InputError(f"{printable(path)}: record {shown} runs past the end of the file (truncated?); re-download or re-export it")
    return data_start, data_end


def validate_torch_zip(f: BinaryIO, size: int, path: Path, require_pickle: bool = True) -> ZipLayout:
    """The archive's records, after checking the whole file is exactly the layout torch.save writes (see module doc).

    require_pickle=False for archives of the same layout without data.pkl (torch.export.save's .pt2).
    """
    count, cd_offset, cd_end = _end_records(f, size, path)
    entries = _central_entries(f, count, cd_offset, cd_end, path)
    try:
        prefix = entries[0].name.decode("utf-8").split("/", 1)[0]
    except UnicodeDecodeError:
        raise _bad(path, "record names are not UTF-8") from None
    layout = ZipLayout(prefix=prefix)
    folded: set[bytes] = set()
    position = 0
    declared = sum(e.size for e in entries)
    if declared > size:
        raise InputError(f"{printable(path)}: records claim {declared:,} bytes but the file has {size:,} (a zip bomb or a "
                         "corrupt file); re-export it with torch.save")
    for entry in sorted(entries, key=lambda e: e.offset):
        if entry.name.lower() in folded:
            raise _bad(path, f"record {printable(entry.name.decode('utf-8', 'replace'))} appears twice")
        folded.add(entry.name.lower())
        data_start, position = _check_record(f, entry, position, size, path)
        name = entry.name.decode("utf-8", "replace")
        layout.records[name] = ZipRecord(name, entry.size, data_start)
    if position != cd_offset:
        raise _bad(path, "bytes between the last record and the central directory (hidden data)")
    if require_pickle and layout.pickle_name not in layout.records and not layout.is_torchscript:
        raise InputError(f"{printable(path)}: archive has no {printable(layout.pickle_name)}, so it holds no checkpoint "
                         "(incomplete or not from torch.save); re-export it")
    return layout


def read_record(f: BinaryIO, record: ZipRecord) -> bytes:
    return _read_at(f, record.data_start, record.size)


def scan_zip_pickle(f: BinaryIO, layout: ZipLayout, size: int, path: Path) -> PickleScan:
    """Statically scan `<archive>/data.pkl` (globals, persistent ids, allocating calls)."""
    data = read_record(f, layout.records[layout.pickle_name])
    try:
        return scan_pickle(io.BytesIO(data), size)
    except ValueError as exc:
        raise InputError(f"{printable(path)}: {printable(layout.pickle_name)} is not a valid pickle ({first_line(exc, 200)}); "
                         "the file is corrupt, re-export it") from None


def check_zip_storages(scan: PickleScan, layout: ZipLayout, path: Path) -> None:
    """Every storage the pickle names must have its `data/<key>` record with exactly the bytes it needs."""
    if len(scan.persids) > MAX_TENSORS:
        raise _bad(path, f"the pickle names {len(scan.persids):,} storages, over bnstrip's limit of {MAX_TENSORS:,}")
    sizes = storage_itemsizes()
    seen: dict[str, int] = {}
    for pid in scan.persids:
        key, nbytes = _zip_storage(pid, sizes, path)
        if seen.setdefault(key, nbytes) != nbytes:
            raise _bad(path, f"storage {printable(key)} is named twice with different sizes")
        record = layout.records.get(f"{layout.prefix}/data/{key}")
        if record is None:
            raise InputError(f"{printable(path)}: archive lacks record {printable(layout.prefix)}/data/{printable(key)}, which "
                             "its pickle refers to (the file is incomplete or crafted: that storage would be uninitialised "
                             "memory); re-download or re-export it")
        if record.size != nbytes:
            raise InputError(f"{printable(path)}: record {printable(record.name)} holds {record.size:,} bytes but its tensor "
                             f"needs {nbytes:,}; the file is corrupt, re-export it")


def _zip_storage(pid: Any, sizes: dict[str, int], path: Path) -> tuple[str, int]:
    """('storage', StorageClass, key, location, numel) -> (key, bytes); InputError for any other shape."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
        raise _bad(path, f"the pickle has a persistent id {printable(repr(pid))[:80]} that is not a storage")
    _, kind, key, _, numel = pid
    name = kind.name if isinstance(kind, Global) else None
    if name is None or not is_storage_class(name) or name not in sizes:
        raise _bad(path, f"storage {printable(repr(key))[:60]} has no known storage type")
    if not isinstance(key, str) or type(numel) is not int or numel < 0:
        raise _bad(path, f"storage {printable(repr(key))[:60]} has a malformed key or size")
    return key, numel * sizes[name]
