"""Load an exported program (`.pt2`, written by torch.export.save) without handing torch any of the file's bytes.

torch.export.load trusts a .pt2 completely: it unpickles with weights_only=False, sympifies (evaluates) shape
strings, resolves call targets by walking `torch.*` attributes, pastes names into generated Python, allocates
what metadata claims and loads every record under `models/` (naming each by cutting its last 5 characters).
So bnstrip parses, it does not validate: it reads the archive itself (bnstrip.io.torchzip: the one layout
torch.save writes), takes only the records the program needs by their exact names, parses each against the
fields it supports, and writes a canonical archive of its own that holds only what it re-emitted:

* the program JSON rebuilt by bnstrip.io.pt2_reemit (generated names, allowlisted ops, re-printed shapes,
  no guard code, no stack traces);
* raw weights/constants copied by bnstrip.io.pt2_payload (each record exactly the bytes its metadata reaches);
* no pickle at all: sample inputs are read here (checkpoint checks, then weights_only) and attached after.

Only that archive is given to torch.export.load; every other record of the file (extra files, a second
`models/` entry, compiled code) is ignored, never loaded.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from bnstrip.errors import InputError, first_line, printable
from bnstrip.io.pt2_payload import Payloads, parse_config, read_payloads
from bnstrip.io.pt2_reemit import reemit_program
from bnstrip.io.pt2_schema import SchemaError
from bnstrip.io.sniff import ZIP_MAGIC, open_regular_file
from bnstrip.io.torchzip import ZipLayout, read_record, validate_torch_zip

_FIX = "re-export it with torch.export.save from a source you trust"
MAX_PROGRAM_JSON = 64 << 20
"""A program JSON larger than this is refused before parsing (json holds several times it in memory; a ResNet-50
program is about 2 MB)."""
_MAX_SAMPLE_DEPTH = 8
MODEL = "model"
"""The one program name bnstrip reads: models/model.json (torch.export.save's name for a single program)."""


@dataclass
class CanonicalProgram:
    """What bnstrip re-emitted from a .pt2: the program document, its payloads and the parsed sample inputs."""

    program: dict[str, Any]
    weights: Payloads
    constants: Payloads
    example_inputs: Any


def _refuse(path: Path, what: str) -> InputError:
    return InputError(f"{printable(path)}: refused: {printable(what)} (nothing was run); {_FIX}")


def _record(f: BinaryIO, layout: ZipLayout, name: str, path: Path, limit: int) -> bytes:
    record = layout.records.get(f"{layout.prefix}/{name}")
    if record is None:
        raise InputError(f"{printable(path)}: the archive lacks {printable(name)} (legacy, incomplete or not a "
                         f"program); {_FIX}")
    if record.size > limit:
        raise _refuse(path, f"{name} is {record.size:,} bytes (limit {limit:,})")
    return read_record(f, record)


def _json(raw: bytes, name: str, path: Path) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{printable(path)}: {name} is not valid JSON ({first_line(exc, 120)}); {_FIX}") from None


def _sample_leaf_ok(value: Any, depth: int) -> bool:
    import torch

    if depth > _MAX_SAMPLE_DEPTH:
        return False
    if isinstance(value, (tuple, list)):
        return len(value) <= 10_000 and all(_sample_leaf_ok(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return len(value) <= 10_000 and all(isinstance(k, str) and _sample_leaf_ok(v, depth + 1) for k, v in value.items())
    return value is None or type(value) in (bool, int, float) or type(value) in (torch.Tensor, torch.nn.Parameter)


def _sample_inputs(f: BinaryIO, layout: ZipLayout, path: Path) -> Any:
    """The saved example inputs, read as a checkpoint is (static checks, then weights_only); None when absent."""
    from bnstrip.io.checkpoint import _torch_load, validate_pickled

    record = layout.records.get(f"{layout.prefix}/data/sample_inputs/{MODEL}.pt")
    if record is None or record.size == 0:
        return None
    data = read_record(f, record)
    inner = Path(f"{path}:data/sample_inputs/{MODEL}.pt")
    if not data.startswith(ZIP_MAGIC):
        raise _refuse(path, "its sample inputs are not a torch.save archive")
    validate_pickled(io.BytesIO(data), "torch-zip", len(data), inner)
    value = _torch_load(io.BytesIO(data), inner)
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], tuple)
            and isinstance(value[1], dict) and _sample_leaf_ok(value, 0)):
        raise _refuse(path, "its sample inputs are not (args, kwargs) of tensors and numbers")
    return value


def read_program(f: BinaryIO, size: int, path: Path) -> CanonicalProgram:
    """Parse the open archive into bnstrip's canonical program (see module docstring); InputError names the file."""
    f.seek(0)
    if f.read(4) != ZIP_MAGIC:
        raise InputError(f"{printable(path)}: not an exported program (.pt2 files are zip archives written by "
                         "torch.export.save); pass such a file")
    layout = validate_torch_zip(f, size, path, require_pickle=False)
    fmt = layout.records.get(f"{layout.prefix}/archive_format")
    if fmt is None or fmt.size > 16 or read_record(f, fmt).strip() != b"pt2":
        raise InputError(f"{printable(path)}: a zip archive but not an exported program (no archive_format pt2; "
                         "a torch.save checkpoint or a pre-2.8 .pt2?); save the program with torch.export.save")
    if f"{layout.prefix}/models/{MODEL}.json" not in layout.records:
        raise InputError(f"{printable(path)}: the archive holds no program models/{MODEL}.json; {_FIX}")
    doc = _json(_record(f, layout, f"models/{MODEL}.json", path, MAX_PROGRAM_JSON), f"models/{MODEL}.json", path)
    try:
        program, emitter = reemit_program(doc)
        payloads = []
        for folder in ("weights", "constants"):
            name = f"data/{folder}/{MODEL}_{folder}_config.json"
            config = parse_config(_record(f, layout, name, path, 64 << 20), name)
            payloads.append(read_payloads(f, layout, folder, config, emitter))
    except SchemaError as exc:
        raise _refuse(path, str(exc)) from None
    return CanonicalProgram(program, payloads[0], payloads[1], _sample_inputs(f, layout, path))


def canonical_archive(parsed: CanonicalProgram) -> bytes:
    """The .pt2 bnstrip writes from what it re-emitted (torch's archive writer, bnstrip's records only)."""
    from torch.export.pt2_archive import PT2ArchiveWriter

    buffer = io.BytesIO()
    with PT2ArchiveWriter(buffer) as writer:
        for folder, payloads in (("weights", parsed.weights), ("constants", parsed.constants)):
            for name, data in payloads.records.items():
                writer.write_bytes(f"data/{folder}/{name}", data)
            writer.write_string(f"data/{folder}/{MODEL}_{folder}_config.json", json.dumps(payloads.config))
        writer.write_bytes(f"models/{MODEL}.json", json.dumps(parsed.program).encode())
        writer.write_bytes(f"data/sample_inputs/{MODEL}.pt", b"")  # no pickle: attached after loading
    return buffer.getvalue()


class _FirstError(logging.Handler):
    """torch.export.load logs why it failed and raises a generic error; keep the logged reason for the one line."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.error: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.error is None and record.exc_info and record.exc_info[1] is not None:
            self.error = record.exc_info[1]


@contextlib.contextmanager
def _torch_export_reason() -> Iterator[_FirstError]:
    logger = logging.getLogger("torch.export")
    handler, saved = _FirstError(), (logger.level, logger.propagate, list(logger.handlers))
    logger.handlers = [handler]  # nothing reaches the user's terminal; the reason goes into the one line
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.level, logger.propagate, logger.handlers = saved


def _reason(exc: BaseException) -> str:
    """What torch said, and the innermost cause when it wrapped one (`KeyError: 'self'` under a SerializeError)."""
    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = f"{type(exc).__name__}: {first_line(exc, 120, '')}"
    if root is not exc:
        text += f"; cause {type(root).__name__}: {first_line(root, 80, '')}"
    return printable(text)


class _LoggedErrors(logging.Handler):
    """Keeps the first exception torch.export logs while loading: its error then names that, not "the warnings above"."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.first: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.first is None and record.exc_info and record.exc_info[1] is not None:
            cause = record.exc_info[1]
            while cause.__cause__ is not None:  # the innermost reason ("failed to resolve X to an operator")
                cause = cause.__cause__
            self.first = cause

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        logger = logging.getLogger("torch.export")
        level, propagate, handlers = logger.level, logger.propagate, logger.handlers
        logger.setLevel(logging.WARNING)  # heard here only: no other handler, not propagated, nothing printed
        logger.propagate, logger.handlers = False, [self]
        try:
            yield
        finally:
            logger.setLevel(level)
            logger.propagate, logger.handlers = propagate, handlers


def load_program(path: str | os.PathLike[str]) -> Any:
    """The ExportedProgram in `path`, loaded from bnstrip's canonical archive; InputError (one line) otherwise."""
    import torch

    from bnstrip.core.torch_env import quiet_torch_logs as _quiet_torch_logs

    path = Path(path)
    with open_regular_file(path) as f:
        parsed = read_program(f, os.fstat(f.fileno()).st_size, path)
    data = canonical_archive(parsed)
    with _quiet_torch_logs(), _torch_export_reason() as reason:
        try:
            program = torch.export.load(io.BytesIO(data))
            if parsed.example_inputs is not None:
                program.example_inputs = parsed.example_inputs
        except Exception as exc:  # noqa: BLE001 - torch raises many types on a program it cannot rebuild
            raise InputError(f"{printable(path)}: torch cannot rebuild the program bnstrip re-emitted from it "
                             f"({_reason(reason.error or exc)}); {_FIX}") from None
    return program


def is_pt2(path: str | os.PathLike[str]) -> bool:
    """True when `path` is a zip archive with an `archive_format` record of `pt2` (content, not suffix)."""
    import zipfile

    try:
        with open_regular_file(path) as f:
            if f.read(4) != ZIP_MAGIC:
                return False
            f.seek(0)
            with zipfile.ZipFile(f) as archive:
                fmt = next((i for i in archive.infolist()
                            if i.filename.count("/") == 1 and i.filename.endswith("/archive_format")), None)
                return fmt is not None and fmt.file_size <= 16 and archive.read(fmt).strip() == b"pt2"
    except (InputError, OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False
