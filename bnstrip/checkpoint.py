"""Read and write checkpoints safely: `.pt` via weights_only torch.load, `.safetensors` via safetensors.

Format is detected from the file's first bytes, never trusted from the extension.
Writes are atomic (temp file in the target directory, fsync, os.replace) and
never touch the input.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from bnstrip.errors import InputError

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
STRIP_PREFIXES = ("module.", "_orig_mod.")

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO2 = b"\x80\x02"


@dataclass
class LoadedCheckpoint:
    """A state_dict plus what was done to get it, so the CLI can report it."""

    state_dict: dict[str, Any]
    path: Path
    format: str
    sha256: str
    unwrapped: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def detect_format(path: str | os.PathLike[str]) -> str:
    """'torch-zip', 'torch-legacy' or 'safetensors' from the first bytes; InputError otherwise."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file; pass a .pt or .safetensors checkpoint")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise InputError(f"{path}: file is empty; re-export the checkpoint")
    if head.startswith(ZIP_MAGIC):
        return "torch-zip"
    if head.startswith(PICKLE_PROTO2) or head[:1] == b"\x80":
        return "torch-legacy"
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and 0 < header_len <= path.stat().st_size - 8:
            return "safetensors"
    raise InputError(f"{path}: not a PyTorch (.pt) or safetensors checkpoint (unrecognised first bytes); pass a checkpoint file")


def _is_tensor_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def unwrap_state_dict(obj: Any, path: Path) -> tuple[dict[str, Any], list[str]]:
    """Find the state_dict inside a training checkpoint and strip DataParallel/compile prefixes."""
    notes: list[str] = []
    while not _is_tensor_dict(obj):
        if isinstance(obj, Mapping):
            inner = next((k for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is not None:
                notes.append(f"unwrapped '{inner}'")
                obj = obj[inner]
                continue
            non_tensor = next((k for k, v in obj.items() if not _is_tensor_dict({str(k): v})), None)
            if not obj:
                raise InputError(f"{path}: checkpoint holds an empty dict; pass a file with a state_dict")
            raise InputError(
                f"{path}: entry {non_tensor!r} is not a tensor and no 'state_dict'/'model'/'model_state_dict' key was found; "
                "save model.state_dict() instead"
            )
        raise InputError(f"{path}: top-level object is a {type(obj).__name__}, not a state_dict; save model.state_dict() instead")
    state = dict(obj)
    for prefix in STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            notes.append(f"stripped prefix '{prefix}'")
    return state, notes


def load_checkpoint(path: str | os.PathLike[str]) -> LoadedCheckpoint:
    """Load a state_dict on the CPU without running code from the file."""
    path = Path(path)
    fmt = detect_format(path)
    digest = sha256_file(path)
    metadata: dict[str, str] = {}
    if fmt == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                raw: Any = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise InputError(f"{path}: unreadable safetensors file ({_one_line(exc)}); re-export it") from None
    else:
        import torch

        try:
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=(fmt == "torch-zip"))
        except Exception as exc:
            raise InputError(f"{path}: cannot load as a weights-only PyTorch checkpoint ({_one_line(exc)})") from None
    state, notes = unwrap_state_dict(raw, path)
    return LoadedCheckpoint(state_dict=state, path=path, format=fmt, sha256=digest, unwrapped=notes, metadata=metadata)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def check_output_path(output: str | os.PathLike[str], inputs: list[str | os.PathLike[str]], force: bool) -> Path:
    """Refuse to write over an input (by inode, so links count) or an existing file without force."""
    output = Path(output)
    for src in inputs:
        src = Path(src)
        if output.exists() and src.exists() and os.path.samefile(output, src):
            raise InputError(f"{output}: output is the input file {src}; choose another output path")
        if output.resolve() == src.resolve():
            raise InputError(f"{output}: output is the input file {src}; choose another output path")
    if output.exists() and not force:
        raise InputError(f"{output}: output exists; pass --force to replace it")
    if output.exists() and not output.is_file():
        raise InputError(f"{output}: output exists and is not a regular file; choose another path")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{output}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{output}: directory {parent} is not writable; choose another output path")
    return output


def output_format(path: str | os.PathLike[str]) -> str:
    """'safetensors' for a .safetensors name, 'torch' otherwise."""
    return "safetensors" if str(path).lower().endswith(".safetensors") else "torch"


def save_checkpoint(state_dict: Mapping[str, Any], path: str | os.PathLike[str], *, force: bool = False,
                    inputs: list[str | os.PathLike[str]] | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a state_dict atomically; format chosen by the output's extension."""
    path = check_output_path(path, list(inputs or []), force)
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        if output_format(path) == "safetensors":
            os.close(fd)
            fd = -1
            from safetensors.torch import save_file

            tensors = {k: v.detach().contiguous().clone() if _shares_storage(v, state_dict) else v.detach().contiguous()
                       for k, v in state_dict.items()}
            save_file(tensors, tmp_name, metadata=dict(metadata or {}))
            with open(tmp_name, "rb+") as f:
                os.fsync(f.fileno())
        else:
            import torch

            with os.fdopen(fd, "wb") as f:
                fd = -1
                torch.save(dict(state_dict), f)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
        _fsync_dir(parent)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise InputError(f"{path}: write failed ({exc.strerror or exc}); free space or choose another output path") from None
        raise
    return path


def _shares_storage(tensor: Any, state_dict: Mapping[str, Any]) -> bool:
    ptr = tensor.untyped_storage().data_ptr()
    return sum(1 for v in state_dict.values() if v.untyped_storage().data_ptr() == ptr) > 1


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
