"""Read checkpoints safely: `.pt` via weights_only torch.load, `.safetensors` by plain reads.

Reading: the file is opened once (only if it is a regular file), its format is
taken from its first bytes (never the extension) and its structure validated
statically (bnstrip.io.torchzip, torchlegacy, pickle_scan, safetensors_check):
every global the pickle names is checked against torch's weights-only set, every
storage must be backed by bytes from the file, and nothing may allocate more than
the file holds, all *before* torch.load runs.  torch.load then runs with
weights_only=True (explicitly, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot override
it; the variable is also hidden for the call).  Nothing is ever retried with
weights_only=False.  The sha256 is computed last, after the checks, so a huge
bogus file is refused without being read.

Writing: bnstrip.io.write (`save_checkpoint`, re-exported here, over `write_atomically`).
The input is never written.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Iterable, Iterator, Mapping, cast

from bnstrip.errors import InputError, first_line, printable
from bnstrip.io.pickle_scan import (
    refuse_allocation,
    refuse_globals,
    scan_legacy,
    scan_pickle,
    unsafe_globals,
)
from bnstrip.io.safetensors_check import read_tensors, validate_safetensors
from bnstrip.io.sniff import detect, open_regular_file
from bnstrip.io.torchlegacy import check_legacy_storages, is_torch_legacy
from bnstrip.io.torchzip import ZipLayout, check_zip_storages, read_record, scan_zip_pickle, validate_torch_zip
from bnstrip.io.write import (  # noqa: F401 - re-exported: callers import the writer's API from here
    RecordingWriter,
    check_output_path,
    check_output_paths,
    output_format,
    save_checkpoint,
    write_atomically,
)

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
STRIP_PREFIXES = ("module.", "_orig_mod.")
MAX_WRAPPER_DEPTH = 8
"""Training checkpoints nest the state_dict one or two levels deep; deeper is crafted."""
LOGICAL_SLACK = 1 << 30
"""Tensors may view their storages (broadcast rows, tied weights), but not claim more than twice the file plus 1 GiB."""

UNSAFE_LOAD_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
"""torch turns weights_only off when this is set and the caller did not pass weights_only; bnstrip hides it anyway."""


@dataclass
class LoadedCheckpoint:
    """A state_dict plus what was done to get it, so the CLI can report it."""

    state_dict: dict[str, Any]
    path: Path
    format: str
    sha256: str
    unwrapped: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a regular file, streamed (a FIFO or device is refused, not read forever)."""
    with open_regular_file(path) as f:
        return _sha256_stream(f)


def _sha256_stream(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    f.seek(0)
    while chunk := f.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def detect_format(path: str | os.PathLike[str]) -> str:
    """'torch-zip', 'torch-legacy' (any pickle) or 'safetensors' from the first bytes; InputError otherwise."""
    path = Path(path)
    with open_regular_file(path) as f:
        return detect(f, os.fstat(f.fileno()).st_size, path)


def _items(obj: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    """The mapping's items through its class, so an `items`/`keys` attribute planted on the instance is ignored."""
    return list(type(obj).items(obj)) if isinstance(obj, dict) else list(obj.items())


def _is_tensor_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in _items(obj))


def unwrap_state_dict(obj: Any, path: Path) -> tuple[dict[str, Any], list[str]]:
    """Find the state_dict inside a training checkpoint and strip DataParallel/compile prefixes.

    Wrappers are followed at most MAX_WRAPPER_DEPTH deep and never twice (a wrapper can contain itself).
    """
    import torch

    shown = printable(path)
    notes: list[str] = []
    seen: set[int] = set()
    while not _is_tensor_dict(obj):
        if id(obj) in seen:
            raise InputError(f"{shown}: the checkpoint's wrapper contains itself (a cycle, crafted); save model.state_dict() instead")
        if len(seen) >= MAX_WRAPPER_DEPTH:
            raise InputError(f"{shown}: state_dict is wrapped more than {MAX_WRAPPER_DEPTH} levels deep; save model.state_dict() instead")
        seen.add(id(obj))
        if not isinstance(obj, Mapping):
            raise InputError(f"{shown}: top-level object is a {type(obj).__name__}, not a state_dict; save model.state_dict() instead")
        items = _items(obj)
        inner = next((k for k in WRAPPER_KEYS for key, v in items if key == k and isinstance(v, Mapping)), None)
        if inner is not None:
            notes.append(f"unwrapped '{inner}'")
            obj = next(v for key, v in items if key == inner)
            continue
        if not items:
            raise InputError(f"{shown}: checkpoint holds an empty dict; pass a file with a state_dict")
        bad_key = next((k for k, _ in items if not isinstance(k, str)), None)
        if bad_key is not None:
            raise InputError(f"{shown}: key {printable(repr(bad_key))[:80]} is a {type(bad_key).__name__}, not a parameter name; "
                             "save model.state_dict() instead")
        key, value = next((k, v) for k, v in items if not isinstance(v, torch.Tensor))
        raise InputError(
            f"{shown}: entry {printable(repr(key))} is not a tensor ({type(value).__name__}) and no 'state_dict'/'model'/"
            "'model_state_dict' key was found; save model.state_dict() instead"
        )
    state = dict(_items(obj))
    for prefix in STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            notes.append(f"stripped prefix '{prefix}'")
    return state, notes


def check_tensors(state: Mapping[str, Any], path: Path, file_size: int | None = None) -> None:
    """Only dense, CPU, non-quantized plain tensors with values can be folded; name the first that is not.

    With `file_size`, the tensors together may not claim more than 2 * file_size + LOGICAL_SLACK bytes (a
    stride-0 view of one stored element can claim terabytes that later work would allocate).
    """
    import torch

    shown = printable(path)
    claimed = 0
    for key, tensor in state.items():
        name = printable(key)
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise InputError(f"{shown}: tensor {name} is a {type(tensor).__name__} (a tensor subclass); save plain tensors")
        if tensor.is_meta:
            raise InputError(f"{shown}: tensor {name} is on the meta device (a shape without values); save the real weights")
        if getattr(tensor, "is_nested", False):
            raise InputError(f"{shown}: tensor {name} is a nested tensor; save dense tensors")
        if tensor.layout != torch.strided:
            raise InputError(f"{shown}: tensor {name} is {str(tensor.layout).replace('torch.', '')}, not dense; "
                             "save dense tensors (tensor.to_dense())")
        if tensor.is_quantized:
            raise InputError(f"{shown}: tensor {name} is quantized ({tensor.dtype}); fold the float model before quantizing")
        if tensor.device.type != "cpu":
            raise InputError(f"{shown}: tensor {name} is on {tensor.device}; bnstrip loads onto the CPU only")
        claimed += tensor.numel() * tensor.element_size()
        if file_size is not None and claimed > 2 * file_size + LOGICAL_SLACK:
            raise InputError(f"{shown}: tensors up to {name} claim {claimed:,} bytes from a {file_size:,}-byte file (views "
                             "that repeat a few stored values); save real tensors with torch.save(model.state_dict(), PATH)")


def load_checkpoint(path: str | os.PathLike[str]) -> LoadedCheckpoint:
    """Load a state_dict on the CPU without running code from the file.

    The file is validated and scanned through a single open descriptor; torch only
    sees it after every check passed; it is hashed last.
    """
    path = Path(path)
    with open_regular_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        fmt = detect(f, size, path)
        metadata: dict[str, str] = {}
        if fmt == "safetensors":
            layout = validate_safetensors(f, size, path)
            metadata = layout.metadata
            raw: Any = read_tensors(f, layout, path)
        else:
            validate_pickled(f, fmt, size, path)
            raw = _torch_load(f, path)
        state, notes = unwrap_state_dict(raw, path)
        check_tensors(state, path, size)
        digest = _sha256_stream(f)
    return LoadedCheckpoint(state_dict=state, path=path, format=fmt, sha256=digest, unwrapped=notes, metadata=metadata)


def validate_pickled(f: BinaryIO, fmt: str, size: int, path: Path) -> None:
    """All static checks of a torch zip or pickle: layout, globals, allocating calls, storages backed by the file."""
    if fmt == "torch-zip":
        layout = validate_torch_zip(f, size, path)
        if layout.is_torchscript:
            raise _torchscript_refusal(f, layout, path)
        scan = scan_zip_pickle(f, layout, size, path)
        forbidden = unsafe_globals(scan.globals + _torch_scanner_globals(f))
        if forbidden:
            raise refuse_globals(path, forbidden)
        if scan.problems:
            raise refuse_allocation(path, scan.problems[0])
        check_zip_storages(scan, layout, path)
        return
    try:
        scans, raw_start = scan_legacy(f, size)
    except ValueError as exc:
        raise InputError(f"{printable(path)}: corrupt pickle ({first_line(exc, 200)}); re-export the checkpoint with torch.save") from None
    forbidden = unsafe_globals(name for scan in scans for name in scan.globals)
    if forbidden:
        raise refuse_globals(path, forbidden)
    problems = [p for scan in scans for p in scan.problems]
    if problems:
        raise refuse_allocation(path, problems[0])
    if not is_torch_legacy(scans):
        raise InputError(f"{printable(path)}: a pickle, but not one written by torch.save; save the state_dict with "
                         "torch.save(model.state_dict(), PATH)")
    check_legacy_storages(f, scans, raw_start, size, path)


def _torch_scanner_globals(f: BinaryIO) -> list[str]:
    """torch's own static scan, as a second opinion (it knows only protocol-2 opcodes; ours covers the rest)."""
    import torch

    f.seek(0)
    try:
        # torch calls only _NoFileno's methods; typeshed's IO[bytes] names more
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(cast(IO[bytes], _NoFileno(f))))
    except Exception:  # noqa: BLE001 - the archive already passed our stricter checks
        return []


def _torchscript_refusal(f: BinaryIO, layout: ZipLayout, path: Path) -> InputError:
    code = ""
    record = layout.records.get(layout.pickle_name)
    if record is not None:
        try:
            names = [n for n in scan_pickle(io.BytesIO(read_record(f, record)), record.size).globals if n.startswith("__torch__")]
        except ValueError:
            names = []
        code = f", compiled code such as {printable(names[0])}" if names else ""
    return InputError(f"{printable(path)}: is a TorchScript archive (a program{code}), which bnstrip will not run; "
                      "pass the model's state_dict saved with torch.save(model.state_dict(), PATH)")


class _NoFileno:
    """The validated descriptor without fileno(): torch then reads it through read() only (no legacy tar path, no mmap)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def readinto(self, buffer: Any) -> int:
        return cast(io.BufferedIOBase, self._f).readinto(buffer)  # open_regular_file's os.fdopen(fd, "rb"); BinaryIO has no readinto

    def readline(self, limit: int = -1) -> bytes:
        return self._f.readline(limit)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


@contextlib.contextmanager
def _without_unsafe_load_env() -> Iterator[None]:
    """Hide TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD for the call (weights_only=True is passed as well)."""
    saved = os.environ.pop(UNSAFE_LOAD_ENV, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[UNSAFE_LOAD_ENV] = saved


def _torch_load(f: BinaryIO, path: Path) -> Any:
    """torch.load from the already-validated descriptor: weights_only, CPU, no mmap (mmap trusts record sizes)."""
    import pickle

    import torch

    f.seek(0)
    with _without_unsafe_load_env(), warnings.catch_warnings(), torch.sparse.check_sparse_tensor_invariants(enable=True):
        warnings.simplefilter("ignore")
        try:
            # torch calls only _NoFileno's methods; typeshed's IO[bytes] names more
            return torch.load(cast(IO[bytes], _NoFileno(f)), map_location="cpu", weights_only=True, mmap=False)
        except pickle.UnpicklingError as exc:
            raise _weights_only_refusal(path, exc) from None
        except MemoryError:
            raise InputError(f"{printable(path)}: not enough memory to load the checkpoint; use a machine with more memory") from None
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/EOFError/ValueError/... for broken files
            raise _load_failure(path, exc) from None


_GLOBAL_PATTERNS = (r"GLOBAL (\S+) was not an allowed global", r"unsupported GLOBAL (\S+)", r"whose module (\S+) is blocked",
                    r"(\S+) must be \S+ to load")


def _weights_only_refusal(path: Path, exc: BaseException) -> InputError:
    """torch's weights-only refusal, reworded: name the global, never suggest allow-listing or weights_only=False."""
    text = str(exc)
    for pattern in _GLOBAL_PATTERNS:
        match = re.search(pattern, text)
        if match:
            return refuse_globals(path, [match.group(1).rstrip(".,")])
    operand = re.search(r"Unsupported operand (\d+)", text)
    what = f"pickle opcode {operand.group(1)}" if operand else "something other than tensors"
    return InputError(f"{printable(path)}: refused: the pickle uses {what}, which a weights-only load does not allow (nothing "
                      "was run); ask for a plain state_dict (torch.save(model.state_dict())) or a .safetensors file")


def _load_failure(path: Path, exc: BaseException) -> InputError:
    """One line for a file torch cannot read, translated from torch's multi-line messages where they are known."""
    shown = printable(path)
    text = str(exc)
    missing = re.search(r"failed locating file (\S+): file not found", text)
    if missing:
        return InputError(f"{shown}: archive lacks record {printable(missing.group(1))}, which its pickle refers to "
                          "(the file is incomplete or corrupt); re-download or re-export it")
    size = re.search(r"record size \((\d+) bytes\) does not match expected size \((\d+) bytes", text)
    if size:
        return InputError(f"{shown}: a tensor record holds {size.group(1)} bytes but its tensor needs {size.group(2)}; "
                          "the file is corrupt, re-export it")
    if "Invalid magic number" in text or "Invalid load key" in text:
        return InputError(f"{shown}: a pickle, but not one written by torch.save; save the state_dict with torch.save")
    detail = first_line(exc)
    if "weights_only" in detail or "safe_globals" in detail:
        detail = type(exc).__name__
    return InputError(f"{shown}: cannot load as a PyTorch checkpoint ({detail}); re-export it with torch.save")


# --------------------------------------------------------------------------- writing


def key_mismatch(expected: Iterable[str], actual: Iterable[str], shown: int = 4) -> str | None:
    """'missing a, b; unexpected c' for two key sets, or None when they are equal (for one-line errors)."""
    expected, actual = set(expected), set(actual)
    parts = []
    for label, keys in (("missing", sorted(expected - actual)), ("unexpected", sorted(actual - expected))):
        if keys:
            parts.append(f"{label} {', '.join(printable(k) for k in keys[:shown])}{' ...' if len(keys) > shown else ''}")
    return "; ".join(parts) or None
