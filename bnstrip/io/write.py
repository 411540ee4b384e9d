"""The one atomic writer: every output bnstrip writes goes through `write_atomically`.

A temp file in the target's directory (so the final step is a rename, not a copy),
fsync, then into place; the directory is fsynced after.  Without force the new file
is put in place by a call that refuses to replace anything (renameat2 with
RENAME_NOREPLACE, else a hard link), so a file that appears at OUT during the run is
never overwritten and the lost race is reported.  SIGINT, SIGTERM and SIGHUP during
the write remove the temp file, keep the old output and raise Interrupted (exit
128 + signal); SIGXFSZ is ignored so `ulimit -f` is an EFBIG error we clean up
after.  `check_output_paths` checks every path a command will write (and the temp
names) before any work, so nothing is replaced unless everything can be written.
`save_checkpoint` writes a state_dict as `.pt` or `.safetensors` through it; `.pt2` bytes
(serialized in memory by torch, whose native writer aborts on a failed write) go through
`write_bytes_atomically`.  A full disk is one line, "no space left on DIR", for every format.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Callable, Iterator, Mapping, cast

from bnstrip.errors import InputError, Interrupted, first_line, printable

TORCH_SUFFIXES = ("", ".pt", ".pth", ".bin", ".ckpt")
"""Names written with torch.save ("" for suffix-less names such as the course's smallNetSaved)."""
SAFETENSORS_SUFFIXES = (".safetensors",)
TEMP_SUFFIX = ".tmp"
TEMP_OVERHEAD = len("." + "." + "abcdefgh" + TEMP_SUFFIX)
"""What mkstemp adds around the output's name: leading dot, dot, 8 random characters, .tmp."""
NO_SPACE_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None)
"""A full disk or an exhausted quota: reported as "no space left on DIR"."""
WRITE_CHUNK = 1 << 20
HANDLED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def output_format(path: str | os.PathLike[str]) -> str:
    """'safetensors' or 'torch' from the output's suffix; InputError for a suffix bnstrip does not write."""
    suffix = Path(path).suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    supported = ", ".join(s for s in TORCH_SUFFIXES + SAFETENSORS_SUFFIXES if s)
    raise InputError(f"{printable(path)}: bnstrip does not write {printable(suffix)} files; name the output with one of "
                     f"{supported} (or no suffix, for torch.save)")


def name_max(directory: Path) -> int:
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _temp_stem(name: str, limit: int) -> str:
    """The output's name cut so the temp name `.{stem}.XXXXXXXX.tmp` fits the file system's NAME_MAX."""
    return os.fsdecode(os.fsencode(name)[: max(1, limit - TEMP_OVERHEAD)]) or "out"


def check_output_path(output: str | os.PathLike[str], inputs: list[str | os.PathLike[str]], force: bool,
                      what: str = "output", checkpoint: bool = True) -> Path:
    """Refuse, before any work: an input as output (by inode, so links count), an existing file without force
    (a dangling symlink counts), a name too long, a missing or unwritable directory, an unsupported suffix
    (for a `checkpoint`; the manifest is JSON)."""
    output = Path(output)
    shown = printable(output)
    if checkpoint:
        output_format(output)
    for src in inputs:
        src = Path(src)
        try:
            same = output.resolve() == src.resolve()
            if not same and os.path.lexists(output) and src.exists():
                with contextlib.suppress(OSError):
                    same = os.path.samefile(output, src)
        except (OSError, RuntimeError):
            raise InputError(f"{shown}: the {what} path is a symbolic link loop; choose another output path") from None
        if same:
            raise InputError(f"{shown}: {what} is the input file {printable(src)}; choose another output path")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{shown}: directory {printable(parent)} does not exist; create it first")
    limit = name_max(parent)
    if len(os.fsencode(output.name)) > limit:
        raise InputError(f"{shown}: the {what} name is {len(os.fsencode(output.name))} bytes, over this file system's "
                         f"{limit}-byte limit; choose a shorter name")
    if os.path.lexists(output):
        if not output.is_file():  # a dangling symlink too: it counts as existing
            raise InputError(f"{shown}: {what} exists and is not a regular file; choose another output path")
        if not force:
            raise InputError(f"{shown}: {what} exists; pass force=True to replace it")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{shown}: directory {printable(parent)} is not writable; choose another output path")
    try:  # os.access says yes to root and knows nothing of read-only mounts: try it, before any long work
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise InputError(f"{shown}: directory {printable(parent)} is not writable ({exc.strerror or exc}); "
                         "choose another output path") from None
    return output


def check_output_paths(outputs: list[str | os.PathLike[str]], inputs: list[str | os.PathLike[str]],
                       force: bool) -> list[Path]:
    """check_output_path for every file a command will write, before it writes any (e.g. OUT and OUT.bnstrip.json).

    Only the first is a checkpoint whose suffix picks the format; the others (manifests) may be named freely.
    """
    checked = [check_output_path(out, inputs, force, checkpoint=index == 0) for index, out in enumerate(outputs)]
    if len({os.path.abspath(p) for p in checked}) != len(checked):
        raise InputError(f"{printable(checked[0])}: two outputs have the same path; choose distinct output paths")
    return checked


# --------------------------------------------------------------------------- writing


class _Stop(BaseException):
    """Raised by the signal handler inside the write; never escapes write_atomically."""


@dataclass
class _SignalState:
    signum: int | None = None
    armed: bool = True

    def handler(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        if self.armed:
            self.armed = False
            raise _Stop(signum)


@contextlib.contextmanager
def _signals_during_write(state: _SignalState) -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP stop the write (cleanly); SIGXFSZ is ignored so a file-size limit is an error. Restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers: dict[int, Any] = {signum: state.handler for signum in HANDLED_SIGNALS}
    if hasattr(signal, "SIGXFSZ"):
        handlers[signal.SIGXFSZ] = signal.SIG_IGN
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class RecordingWriter:
    """A file wrapper that keeps the OSError a write raised: torch.save turns it into an unrelated RuntimeError."""

    def __init__(self, f: BinaryIO | None) -> None:
        self._f = f
        self.error: OSError | None = None

    def attach(self, f: BinaryIO) -> None:
        self._f = f

    def _attached(self) -> BinaryIO:
        return cast(BinaryIO, self._f)  # the writers attach the file before they write (None until then)

    def write(self, data: Any) -> int:
        try:
            return self._attached().write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self._attached().flush()

    def tell(self) -> int:
        return self._attached().tell()

    def seek(self, *args: Any) -> int:
        return self._attached().seek(*args)


def _renameat2_noreplace(source: str, target: Path) -> bool:
    """rename(source, target) unless target exists (FileExistsError); False where the call is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_noreplace = -100, 1
    result = renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), rename_noreplace)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), str(target))
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(target))


def place(temp_name: str, path: Path, replace: bool) -> None:
    """Put the finished temp file at `path`: os.replace with `replace`, else a call that refuses to replace."""
    if replace:
        os.replace(temp_name, path)
        return
    if _renameat2_noreplace(temp_name, path):
        return
    os.link(temp_name, path)  # EEXIST if anything is there, a dangling symlink included
    os.unlink(temp_name)


def write_atomically(path: Path, write: Callable[[str], object], writer: RecordingWriter | None = None, *,
                     replace: bool = True, before_replace: Callable[[str], None] | None = None) -> None:
    """Call write(temp_name) on a temp file beside `path`, fsync it, then put it at `path` (see the module doc).

    Readers of `path` see the old file or the complete new one, even if the process
    is killed mid-write. After a failure or a signal no temp file remains and the
    old output is untouched. `replace=False` (no force) never overwrites a file
    that appeared at `path` meanwhile. Pass the RecordingWriter that `write` uses,
    if any, so the real OSError behind a library's wrapped error can be named.
    `before_replace(temp_name)` runs on the complete, fsynced temp file just before it
    is put in place (e.g. to write OUT's manifest first); if it raises, nothing is placed.
    """
    path = Path(path)
    shown = printable(path)
    parent = path.parent if str(path.parent) else Path(".")
    state = _SignalState()
    tmp_name: str | None = None
    placed = False
    with _signals_during_write(state):
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{_temp_stem(path.name, name_max(parent))}.", suffix=TEMP_SUFFIX, dir=parent)
            os.close(fd)
            write(tmp_name)
            with open(tmp_name, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp_name, 0o644)
            if before_replace is not None:
                before_replace(tmp_name)
            state.armed = False  # from here on a signal waits until the file is in place
            if state.signum is not None:
                raise _Stop(state.signum)
            place(tmp_name, path, replace)
            placed = True
            _fsync_dir(parent)
        except BaseException as exc:
            state.armed = False
            if tmp_name is not None and not placed:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
            if state.signum is not None and not placed:
                name = signal.Signals(state.signum).name
                raise Interrupted(f"{shown}: interrupted by {name} while writing; nothing was written, the old output "
                                  "is unchanged", state.signum) from None
            if isinstance(exc, FileExistsError) and not placed:
                raise InputError(f"{shown}: another file appeared at the output while bnstrip was writing; it was not "
                                 "replaced and nothing was written; pass force=True or choose another output path") from None
            if tmp_name is None and isinstance(exc, OSError):
                raise InputError(f"{shown}: cannot create a file in {printable(parent)} ({exc.strerror or exc}); "
                                 "choose another output path") from None
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            reason, code = _write_failure_reason(exc, writer)
            if reason is None:
                raise
            if code in NO_SPACE_ERRNOS:
                raise InputError(f"{shown}: no space left on {printable(parent)}; nothing was written and the old output "
                                 "is unchanged; free space or choose another output path") from None
            raise InputError(f"{shown}: write failed ({reason}); nothing was written, free space or choose another output path") from None
    if state.signum is not None:  # arrived after the file was in place: the write is complete, deliver it now
        signal.raise_signal(state.signum)


def _write_failure_reason(exc: BaseException, writer: RecordingWriter | None) -> tuple[str | None, int | None]:
    """(a readable reason, its errno) for an I/O failure; (None, None) for one not about I/O (re-raised as is)."""
    if writer is not None and writer.error is not None:
        return writer.error.strerror or str(writer.error), writer.error.errno
    if isinstance(exc, OSError):
        return exc.strerror or str(exc), exc.errno
    match = re.search(r"os error (\d+)", str(exc))
    if match:
        return os.strerror(int(match.group(1))), int(match.group(1))
    if type(exc).__name__ == "SafetensorError" or "inline_container" in str(exc):
        return first_line(exc), None
    return None, None


def write_bytes_atomically(path: Path, data: bytes | memoryview, *, replace: bool = True,
                           before_replace: Callable[[str], None] | None = None) -> None:
    """`data` written by bnstrip itself (plain writes, chunk by chunk) through write_atomically.

    For outputs a library serializes with a native writer that aborts the process on a
    full disk (torch.export.save): the library fills a memory buffer, this writes it.
    """
    recorder = RecordingWriter(None)
    view = memoryview(data)

    def write(tmp_name: str) -> None:
        with open(tmp_name, "wb") as f:
            recorder.attach(f)
            for start in range(0, len(view), WRITE_CHUNK):
                recorder.write(view[start:start + WRITE_CHUNK])
            recorder.flush()

    write_atomically(path, write, recorder, replace=replace, before_replace=before_replace)


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


def _unshared(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Contiguous tensors for safetensors, each shared one (as safetensors itself finds them) given its own copy."""
    from safetensors.torch import _find_shared_tensors

    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    for group in _find_shared_tensors(tensors):
        for name in sorted(group)[1:]:
            tensors[name] = tensors[name].clone()
    return tensors


def stream_safetensors(tensors: Mapping[str, Any], out: RecordingWriter, metadata: dict[str, str]) -> None:
    """safetensors (8-byte header length, JSON header padded to 8, raw little-endian data) through bnstrip's writes:
    the library's writer renames its own temp into place (left behind on a full disk); its `save` doubles memory."""
    import json
    import sys

    import torch

    from bnstrip.io.safetensors_check import torch_dtypes

    if sys.byteorder != "little":
        raise InputError("safetensors output needs a little-endian machine; write a .pt checkpoint instead")
    names = {dtype: name for name, dtype in torch_dtypes().items()}
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, tensor in tensors.items():
        if tensor.dtype not in names:
            raise InputError(f"tensor {key} is {tensor.dtype}, which safetensors cannot hold; write a .pt checkpoint")
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    out.write(len(raw).to_bytes(8, "little"))
    out.write(raw)
    for tensor in tensors.values():
        if tensor.numel():
            flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            out.write(memoryview(flat.numpy()))


def save_checkpoint(state_dict: Mapping[str, Any], path: str | os.PathLike[str], *, force: bool = False,
                    inputs: list[str | os.PathLike[str]] | None = None, metadata: Mapping[str, str] | None = None,
                    before_replace: Callable[[str], None] | None = None) -> Path:
    """Write a state_dict atomically (see write_atomically); format chosen by the output's suffix.

    Without force an existing output, or one that appears during the write, is never replaced.
    `before_replace(temp_name)` runs on the complete temp file before it is put in place.
    """
    path = check_output_path(path, list(inputs or []), force)
    if output_format(path) == "safetensors":
        recorder_st = RecordingWriter(None)

        def write_safetensors(tmp_name: str) -> None:
            with open(tmp_name, "wb") as f:
                recorder_st.attach(f)
                stream_safetensors(_unshared(state_dict), recorder_st, dict(metadata or {}))
                recorder_st.flush()

        write_atomically(path, write_safetensors, recorder_st, replace=force, before_replace=before_replace)
        return path

    import torch

    recorder = RecordingWriter(None)

    def write_torch(tmp_name: str) -> None:
        with open(tmp_name, "wb") as f:
            recorder.attach(f)
            torch.save(dict(state_dict), cast(IO[bytes], recorder))  # torch calls only its write/flush/tell/seek
            f.flush()

    write_atomically(path, write_torch, recorder, replace=force, before_replace=before_replace)
    return path
