"""Read and write checkpoints safely: `.pt` via weights_only torch.load, `.safetensors` via safetensors.

Reading: the file is opened once (only if it is a regular file), its format is
taken from its first bytes (never the extension), its structure is validated by
bnstrip.io.safety, every global its pickle names is checked against torch's
weights-only set *before* torch.load runs, and torch.load then runs with
weights_only=True (explicitly, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot
override it; the variable is also hidden for the call).  Nothing is ever retried
with weights_only=False.

Writing: a temp file in the target directory, fsync, os.replace, fsync of the
directory; on any failure the temp file is removed and the old output (if any)
is left as it was.  The input is never written.
"""
from __future__ import annotations

import contextlib
from collections import Counter
import hashlib
import os
import re
import signal
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping

from bnstrip.errors import InputError, first_line
from bnstrip.io.safety import (
    ZIP_MAGIC,
    describe_non_checkpoint,
    looks_like_pickle,
    looks_like_safetensors,
    open_regular_file,
    parses_as_pickle,
    pickle_globals,
    refuse_globals,
    scan_legacy_pickles,
    scan_zip_pickle,
    validate_safetensors,
    validate_torch_zip,
)

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
STRIP_PREFIXES = ("module.", "_orig_mod.")

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
        return _detect(f, os.fstat(f.fileno()).st_size, path)


def _detect(f: BinaryIO, size: int, path: Path) -> str:
    if size == 0:
        raise InputError(f"{path}: file is empty; re-export or re-download the checkpoint")
    f.seek(0)
    head = f.read(64)
    if head.startswith(ZIP_MAGIC):
        return "torch-zip"
    if looks_like_pickle(head):
        return "torch-legacy"
    if looks_like_safetensors(head):
        return "safetensors"
    if parses_as_pickle(f, size):  # protocol 0/1 pickles have no PROTO opcode; they are still scanned, never run
        return "torch-legacy"
    raise describe_non_checkpoint(head, path)


def _is_tensor_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def unwrap_state_dict(obj: Any, path: Path) -> tuple[dict[str, Any], list[str]]:
    """Find the state_dict inside a training checkpoint and strip DataParallel/compile prefixes."""
    import torch

    notes: list[str] = []
    while not _is_tensor_dict(obj):
        if isinstance(obj, Mapping):
            inner = next((k for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is not None:
                notes.append(f"unwrapped '{inner}'")
                obj = obj[inner]
                continue
            if not obj:
                raise InputError(f"{path}: checkpoint holds an empty dict; pass a file with a state_dict")
            bad_key = next((k for k in obj if not isinstance(k, str)), None)
            if bad_key is not None:
                raise InputError(f"{path}: key {bad_key!r} is a {type(bad_key).__name__}, not a parameter name; save model.state_dict() instead")
            key, value = next((k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor))
            raise InputError(
                f"{path}: entry {key!r} is not a tensor ({type(value).__name__}) and no 'state_dict'/'model'/'model_state_dict' "
                "key was found; save model.state_dict() instead"
            )
        raise InputError(f"{path}: top-level object is a {type(obj).__name__}, not a state_dict; save model.state_dict() instead")
    state = dict(obj)
    for prefix in STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            notes.append(f"stripped prefix '{prefix}'")
    return state, notes


def check_tensors(state: Mapping[str, Any], path: Path) -> None:
    """Only dense, CPU, non-quantized tensors with values can be folded; name the first that is not."""
    import torch

    for key, tensor in state.items():
        if tensor.is_meta:
            raise InputError(f"{path}: tensor {key} is on the meta device (a shape without values); save the real weights")
        if getattr(tensor, "is_nested", False):
            raise InputError(f"{path}: tensor {key} is a nested tensor; save dense tensors")
        if tensor.layout != torch.strided:
            raise InputError(f"{path}: tensor {key} is {str(tensor.layout).replace('torch.', '')}, not dense; "
                             "save dense tensors (tensor.to_dense())")
        if tensor.is_quantized:
            raise InputError(f"{path}: tensor {key} is quantized ({tensor.dtype}); fold the float model before quantizing")
        if tensor.device.type != "cpu":
            raise InputError(f"{path}: tensor {key} is on {tensor.device}; bnstrip loads onto the CPU only")


def load_checkpoint(path: str | os.PathLike[str]) -> LoadedCheckpoint:
    """Load a state_dict on the CPU without running code from the file.

    The file is validated and scanned through a single open descriptor; torch or
    safetensors only see it after every check passed.
    """
    path = Path(path)
    with open_regular_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        fmt = _detect(f, size, path)
        digest = _sha256_stream(f)
        metadata: dict[str, str] = {}
        if fmt == "safetensors":
            layout = validate_safetensors(f, size, path)
            metadata = layout.metadata
            raw: Any = _read_safetensors(path, f, list(layout.tensors))
        else:
            if fmt == "torch-zip":
                zip_layout = validate_torch_zip(f, size, path)
                if zip_layout.is_torchscript:
                    raise _torchscript_refusal(f, zip_layout, path)
                forbidden = scan_zip_pickle(f, zip_layout, path)
            else:
                forbidden = scan_legacy_pickles(f, size, path)
            if forbidden:
                raise refuse_globals(path, forbidden)
            raw = _torch_load(f, path)
    state, notes = unwrap_state_dict(raw, path)
    check_tensors(state, path)
    return LoadedCheckpoint(state_dict=state, path=path, format=fmt, sha256=digest, unwrapped=notes, metadata=metadata)


def _read_safetensors(path: Path, f: BinaryIO, names: list[str]) -> dict[str, Any]:
    """Read the tensors with the safetensors library, after checking the path still names the validated file."""
    from safetensors import safe_open

    opened, now = os.fstat(f.fileno()), os.stat(path)
    if (opened.st_dev, opened.st_ino, opened.st_size) != (now.st_dev, now.st_ino, now.st_size):
        raise InputError(f"{path}: the file changed while it was being read; try again when nothing is writing it")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as st:
            return {name: st.get_tensor(name) for name in names}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise InputError(f"{path}: unreadable safetensors file ({first_line(exc)}); re-export it") from None


def _torchscript_refusal(f: BinaryIO, layout: Any, path: Path) -> InputError:
    code = ""
    record = layout.records.get(layout.pickle_name)
    if record is not None:
        import io

        f.seek(record.data_start)
        try:
            names = [n for n in pickle_globals(io.BytesIO(f.read(record.size))) if n.startswith("__torch__")]
        except ValueError:
            names = []
        code = f", compiled code such as {names[0]}" if names else ""
    return InputError(f"{path}: is a TorchScript archive (a program{code}), which bnstrip will not run; "
                      "pass the model's state_dict saved with torch.save(model.state_dict(), ...)")


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
            return torch.load(f, map_location="cpu", weights_only=True, mmap=False)
        except pickle.UnpicklingError as exc:
            raise _weights_only_refusal(path, exc) from None
        except MemoryError:
            raise InputError(f"{path}: not enough memory to load the checkpoint; use a machine with more memory") from None
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
    return InputError(f"{path}: refused: the pickle uses {what}, which a weights-only load does not allow (nothing was run); "
                      "ask for a plain state_dict (torch.save(model.state_dict())) or a .safetensors file")


def _load_failure(path: Path, exc: BaseException) -> InputError:
    """One line for a file torch cannot read, translated from torch's multi-line messages where they are known."""
    text = str(exc)
    missing = re.search(r"failed locating file (\S+): file not found", text)
    if missing:
        return InputError(f"{path}: archive lacks record {missing.group(1)}, which its pickle refers to "
                          "(the file is incomplete or corrupt); re-download or re-export it")
    size = re.search(r"record size \((\d+) bytes\) does not match expected size \((\d+) bytes", text)
    if size:
        return InputError(f"{path}: a tensor record holds {size.group(1)} bytes but its tensor needs {size.group(2)}; "
                          "the file is corrupt, re-export it")
    if "Invalid magic number" in text or "Invalid load key" in text:
        return InputError(f"{path}: a pickle, but not one written by torch.save; save the state_dict with torch.save")
    detail = first_line(exc)
    if "weights_only" in detail or "safe_globals" in detail:
        detail = type(exc).__name__
    return InputError(f"{path}: cannot load as a PyTorch checkpoint ({detail}); re-export it with torch.save")




# --------------------------------------------------------------------------- writing


def key_mismatch(expected: Iterable[str], actual: Iterable[str], shown: int = 4) -> str | None:
    """'missing a, b; unexpected c' for two key sets, or None when they are equal (for one-line errors)."""
    expected, actual = set(expected), set(actual)
    parts = []
    for label, keys in (("missing", sorted(expected - actual)), ("unexpected", sorted(actual - expected))):
        if keys:
            parts.append(f"{label} {', '.join(keys[:shown])}{' ...' if len(keys) > shown else ''}")
    return "; ".join(parts) or None


def check_output_path(output: str | os.PathLike[str], inputs: list[str | os.PathLike[str]], force: bool) -> Path:
    """Refuse to write over an input (by inode, so links count) or an existing file without force."""
    output = Path(output)
    for src in inputs:
        src = Path(src)
        same = output.resolve() == src.resolve()
        if not same and output.exists() and src.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(output, src)
        if same:
            raise InputError(f"{output}: output is the input file {src}; choose another output path")
    if output.exists() and not output.is_file():
        raise InputError(f"{output}: output exists and is not a regular file; choose another output path")
    if output.exists() and not force:
        raise InputError(f"{output}: output exists; pass --force to replace it")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{output}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{output}: directory {parent} is not writable; choose another output path")
    try:  # os.access says yes to root and knows nothing of read-only mounts: try it, before any long work
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise InputError(f"{output}: directory {parent} is not writable ({exc.strerror or exc}); choose another output path") from None
    return output


def output_format(path: str | os.PathLike[str]) -> str:
    """'safetensors' for a .safetensors name, 'torch' otherwise."""
    return "safetensors" if str(path).lower().endswith(".safetensors") else "torch"


class _RecordingWriter:
    """A file wrapper that keeps the OSError a write raised: torch.save turns it into an unrelated RuntimeError."""

    def __init__(self, f: BinaryIO | None) -> None:
        self._f = f
        self.error: OSError | None = None

    def attach(self, f: BinaryIO) -> None:
        self._f = f

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, *args: Any) -> int:
        return self._f.seek(*args)


@contextlib.contextmanager
def _file_size_limit_as_error() -> Iterator[None]:
    """Ignore SIGXFSZ during the write, so hitting `ulimit -f` is an EFBIG error we can clean up after, not a kill."""
    sigxfsz = getattr(signal, "SIGXFSZ", None)
    if sigxfsz is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(sigxfsz, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(sigxfsz, previous)


def write_atomically(path: Path, write: Callable[[str], None], writer: "_RecordingWriter | None" = None) -> None:
    """Call write(temp_name) on a temp file beside `path`, fsync it, then os.replace it over `path`.

    Readers of `path` see either the old file or the complete new one, even if the
    process is killed mid-write; after an ordinary failure no temp file remains and
    the error is one InputError line. Pass the _RecordingWriter that `write` uses, if
    any, so the real OSError behind a library's wrapped error can be named.
    """
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
    except OSError as exc:
        raise InputError(f"{path}: cannot create a file in {parent} ({exc.strerror or exc}); choose another output path") from None
    try:
        with _file_size_limit_as_error():
            write(tmp_name)
            with open(tmp_name, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
        _fsync_dir(parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        reason = _write_failure_reason(exc, writer)
        if reason is None:
            raise
        raise InputError(f"{path}: write failed ({reason}); nothing was written, free space or choose another output path") from None


def save_checkpoint(state_dict: Mapping[str, Any], path: str | os.PathLike[str], *, force: bool = False,
                    inputs: list[str | os.PathLike[str]] | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a state_dict atomically (see write_atomically); format chosen by the output's extension."""
    path = check_output_path(path, list(inputs or []), force)
    if output_format(path) == "safetensors":
        from safetensors.torch import save_file

        def write(tmp_name: str) -> None:
            # safetensors refuses tensors that share memory: give each shared one its own copy
            users = Counter(v.untyped_storage().data_ptr() for v in state_dict.values())
            tensors = {k: v.detach().contiguous().clone() if users[v.untyped_storage().data_ptr()] > 1 else v.detach().contiguous()
                       for k, v in state_dict.items()}
            save_file(tensors, tmp_name, metadata=dict(metadata or {}))

        write_atomically(path, write)
        return path

    import torch

    recorder = _RecordingWriter(None)

    def write(tmp_name: str) -> None:
        with open(tmp_name, "wb") as f:
            recorder.attach(f)
            torch.save(dict(state_dict), recorder)
            f.flush()

    write_atomically(path, write, recorder)
    return path


def _write_failure_reason(exc: BaseException, writer: _RecordingWriter | None) -> str | None:
    """A readable reason for an I/O failure, or None for a failure that is not about I/O (re-raised as is)."""
    if writer is not None and writer.error is not None:
        return writer.error.strerror or str(writer.error)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    match = re.search(r"os error (\d+)", str(exc))
    if match:
        return os.strerror(int(match.group(1)))
    if type(exc).__name__ == "SafetensorError" or "inline_container" in str(exc):
        return first_line(exc)
    return None


def _fsync_dir(directory: Path) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
