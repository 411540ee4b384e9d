"""CIFAR-10 in the official python-batch layout, found locally or downloaded and md5-checked.

Dataset pickles can run code as easily as checkpoints can, so batches are read
with an unpickler that admits only numpy's array reconstruction.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from bnstrip.errors import InputError

BATCHES_DIRNAME = "cifar-10-batches-py"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
DATA_DIR_ENV = "BNSTRIP_DATA_DIR"

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2: str -> bytes, nothing more
}


class _BatchUnpickler(pickle.Unpickler):
    """Admits numpy array reconstruction and nothing else (no os.system, no eval)."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR-10 batch")


@dataclass(frozen=True)
class Split:
    """Images as uint8 (N, 3, 32, 32) and integer labels (N,)."""

    images: np.ndarray
    labels: np.ndarray
    source: Path

    def __len__(self) -> int:
        return len(self.labels)


def default_cache_dir() -> Path:
    """The per-user cache where a downloaded copy lives (XDG_CACHE_HOME honoured)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bnstrip"


def candidate_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where to look, in order: --data-dir, $BNSTRIP_DATA_DIR, the user cache, ./data."""
    dirs: list[Path] = []
    if data_dir is not None:
        dirs.append(Path(data_dir))
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        dirs.append(Path(env))
    dirs += [default_cache_dir(), Path("data")]
    return dirs


def _batches_dir(root: Path) -> Path | None:
    for candidate in (root / BATCHES_DIRNAME, root):
        if (candidate / TEST_BATCH).is_file():
            return candidate
    return None


def find_batches_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The first candidate holding `cifar-10-batches-py/test_batch` (or being that folder)."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise InputError(f"{data_dir}: --data-dir is not a directory; point it at the folder holding {BATCHES_DIRNAME}/")
    for root in candidate_dirs(data_dir):
        found = _batches_dir(root)
        if found is not None:
            return found
    return None


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python-batch file as (uint8 images N x 3 x 32 x 32, int64 labels)."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: not a readable CIFAR-10 python batch ({exc}); re-download or point --data-dir at a good copy") from None
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise InputError(f"{path}: CIFAR-10 batch lacks 'data'/'labels'; point --data-dir at an official python-batch copy")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
        raise InputError(f"{path}: CIFAR-10 batch has data {data.dtype} {data.shape} and {len(labels)} labels; expected uint8 (N, 3072) with N labels")
    return data.reshape(-1, 3, 32, 32), labels


def download(target_root: Path, progress: Callable[[int, int], None] | None = None, timeout: float = 30.0) -> Path:
    """Fetch the official archive, check its published md5, unpack into target_root."""
    import urllib.request

    target_root.mkdir(parents=True, exist_ok=True)
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(ARCHIVE_URL, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            with tempfile.TemporaryFile(dir=target_root) as tmp:
                done = 0
                while chunk := response.read(1 << 20):
                    tmp.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
                if digest.hexdigest() != ARCHIVE_MD5:
                    raise InputError(f"{ARCHIVE_URL}: md5 {digest.hexdigest()} is not the published {ARCHIVE_MD5}; retry, or pass --data-dir to a local copy")
                tmp.seek(0)
                with tarfile.open(fileobj=tmp, mode="r:gz") as tar:
                    tar.extractall(target_root, filter="data")
    except OSError as exc:
        raise InputError(
            f"CIFAR-10 not found and download failed ({exc}); pass --data-dir DIR or set {DATA_DIR_ENV} to a folder holding {BATCHES_DIRNAME}/"
        ) from None
    found = _batches_dir(target_root)
    if found is None:
        raise InputError(f"{target_root}: downloaded archive did not contain {BATCHES_DIRNAME}/{TEST_BATCH}")
    return found


def locate(data_dir: str | os.PathLike[str] | None = None, allow_download: bool = True,
           progress: Callable[[int, int], None] | None = None) -> Path:
    """The batches folder, downloading into the user cache only when no local copy exists."""
    found = find_batches_dir(data_dir)
    if found is not None:
        return found
    looked = ", ".join(str(p) for p in candidate_dirs(data_dir))
    if not allow_download:
        raise InputError(f"CIFAR-10 ({BATCHES_DIRNAME}/{TEST_BATCH}) not found in {looked}; pass --data-dir DIR or set {DATA_DIR_ENV}")
    try:
        return download(default_cache_dir(), progress=progress)
    except InputError as exc:
        raise InputError(f"CIFAR-10 not found in {looked} and download failed: {exc}") from None


def load_split(split: str = "test", data_dir: str | os.PathLike[str] | None = None, allow_download: bool = True,
               progress: Callable[[int, int], None] | None = None) -> Split:
    """The CIFAR-10 test split (10,000 images) or train split (50,000) as uint8 arrays."""
    root = locate(data_dir, allow_download=allow_download, progress=progress)
    names: Iterable[str] = (TEST_BATCH,) if split == "test" else TRAIN_BATCHES
    parts = [read_batch(root / name) for name in names]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return Split(images=images, labels=labels, source=root)


def to_float_tensor(images: np.ndarray):
    """torchvision's ToTensor for CHW uint8: float32 in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255)


def load_npz_sample(path: str | os.PathLike[str]) -> Split:
    """A small committed sample (tests/data) stored as .npz with `images` and `labels`."""
    with np.load(path, allow_pickle=False) as z:
        return Split(images=z["images"], labels=z["labels"].astype(np.int64), source=Path(path))
