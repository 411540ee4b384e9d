"""The weights and constants of a `.pt2` read from their records and re-emitted, each sized before any allocation.

A payload config (`data/weights/model_weights_config.json`) maps each tensor name to a record and its metadata.
torch trusts both: a 0-byte record makes it allocate `torch.zeros(sizes)` from the metadata alone, a pickled
entry is unpickled with weights_only=False. bnstrip reads only raw (unpickled) tensors, computes the bytes each
one reaches from its sizes, strides and offset, and refuses a record holding fewer bytes (a 0-byte record that
claims 1.5 GB included) before reading or allocating anything; then it copies exactly those bytes into a record
of its own (`weight_N`/`tensor_N`), so torch sees records whose length is the size their metadata declares.
Tensors that share a record keep sharing one.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from bnstrip.io.limits import MAX_TENSORS
from bnstrip.io.pt2_schema import (
    SCALAR_TYPES,
    Emitter,
    SchemaError,
    _bool,
    _dict,
    _need,
)
from bnstrip.io.torchzip import ZipLayout, ZipRecord

MAX_CONFIG_BYTES = 64 << 20
_PREFIXES = {"weights": "weight_", "constants": "tensor_"}


@dataclass
class Payloads:
    """One folder's canonical config and the records it names (new record name -> bytes)."""

    config: dict[str, Any] = field(default_factory=dict)
    records: dict[str, bytes] = field(default_factory=dict)


def reach_bytes(meta: dict[str, Any]) -> int:
    """Bytes of storage a canonical tensor meta reaches: (offset + last element + 1) * element size; 0 if empty."""
    sizes = [s["as_int"] for s in meta["sizes"]]
    strides = [s["as_int"] for s in meta["strides"]]
    offset = meta["storage_offset"]["as_int"]
    _need(all(v >= 0 for v in sizes + strides) and offset >= 0, "a stored tensor has negative sizes or strides")
    _need(len(sizes) == len(strides), "a stored tensor has sizes and strides of different ranks")
    if 0 in sizes:
        return 0
    return (offset + 1 + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True))) * SCALAR_TYPES[meta["dtype"]]


def _entries(doc: Any, folder: str, e: Emitter) -> dict[str, tuple[str, bool, dict[str, Any]]]:
    """fqn (mapped) -> (source record name, is_param, canonical tensor meta); SchemaError for anything else."""
    config = _dict(_dict(doc, f"{folder} config", {"config"}).get("config"), f"{folder} config")
    _need(len(config) <= MAX_TENSORS, f"{folder} config names {len(config):,} tensors (limit {MAX_TENSORS:,})")
    out = {}
    for fqn, meta in config.items():
        what = f"{folder} entry {str(fqn)[:60]!r}"
        body = _dict(meta, what, {"path_name", "is_param", "use_pickle", "tensor_meta"})
        source = body.get("path_name")
        _need(isinstance(source, str) and bool(re.fullmatch(_PREFIXES[folder] + r"[0-9]{1,9}", source)),
              f"{what} is a pickled Python/TorchScript object or names record {str(source)[:40]!r}")
        assert isinstance(source, str)
        _need(body.get("use_pickle") is False, f"{what} is pickled (a tensor subclass or Python object)")
        name = e.fqn(fqn, what)
        _need(name not in out, f"{what} appears twice")
        out[name] = (source, _bool(body.get("is_param"), what), e.tensor_meta(body.get("tensor_meta"), what, True))
    return out


def read_payloads(f: BinaryIO, layout: ZipLayout, folder: str, doc: Any, e: Emitter) -> Payloads:
    """The folder's tensors re-emitted (see module docstring); SchemaError names the tensor and the shortfall."""
    entries = _entries(doc, folder, e)
    need: dict[str, int] = {}
    dtypes: dict[str, int] = {}
    for source, _, meta in entries.values():
        need[source] = max(need.get(source, 0), reach_bytes(meta))
        _need(dtypes.setdefault(source, meta["dtype"]) == meta["dtype"], f"record {source} is read as two dtypes")
    records: dict[str, ZipRecord] = {}
    for source, nbytes in need.items():
        record = layout.records.get(f"{layout.prefix}/data/{folder}/{source}")
        _need(record is not None, f"the archive lacks record data/{folder}/{source}, which tensors name (incomplete file)")
        assert record is not None
        if record.size < nbytes:
            holder = next(fqn for fqn, (s, _, m) in entries.items() if s == source and reach_bytes(m) == nbytes)
            raise SchemaError(f"tensor {holder} needs {nbytes:,} bytes but its record data/{folder}/{source} holds "
                              f"{record.size:,} (truncated or crafted)")
        records[source] = record
    renamed = {source: f"{_PREFIXES[folder]}{i}" for i, source in enumerate(need)}
    out = Payloads()
    for source, record in records.items():
        f.seek(record.data_start)
        data = f.read(need[source])
        _need(len(data) == need[source], f"record data/{folder}/{source} runs past the end of the file")
        out.records[renamed[source]] = data
    out.config = {"config": {fqn: {"path_name": renamed[source], "is_param": is_param, "use_pickle": False,
                                   "tensor_meta": meta} for fqn, (source, is_param, meta) in entries.items()}}
    return out


def parse_config(raw: bytes, what: str) -> Any:
    """A payload config's JSON, bounded in size; SchemaError when it is not JSON."""
    _need(len(raw) <= MAX_CONFIG_BYTES, f"{what} is {len(raw):,} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise SchemaError(f"{what} is not valid JSON") from None
