"""CIFAR-10 in the official python-batch layout, found locally or downloaded and md5-checked.

Dataset pickles can run code as easily as checkpoints can, so batches are read
with an unpickler that admits only numpy's array reconstruction.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from bnstrip.errors import InputError
from bnstrip.homework.cifar_batch import read_batch  # noqa: F401 - the bounded, checked unpickler lives there

BATCHES_DIRNAME = "cifar-10-batches-py"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_MB = 163
"""Size of the official archive (170,498,071 bytes), said in messages so a user knows what a download costs."""
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
DATA_DIR_ENV = "BNSTRIP_DATA_DIR"

@dataclass(frozen=True)
class Split:
    """Images as uint8 (N, 3, 32, 32) and integer labels (N,)."""

    images: np.ndarray
    labels: np.ndarray
    source: Path
    md5: str = ""
    """md5 of the batch file(s) read, so a figure can be cited with the exact data it came from."""

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
    """The first candidate holding `cifar-10-batches-py/test_batch` (or being that folder).

    An explicit `data_dir` is the only place looked: a choice the user made that fails is an error, not a fallback.
    """
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise InputError(f"{data_dir}: not a directory; pass data_dir=DIR, the folder holding {BATCHES_DIRNAME}/")
        found = _batches_dir(Path(data_dir))
        if found is None:
            raise InputError(f"{data_dir}: no {BATCHES_DIRNAME}/{TEST_BATCH} here; pass data_dir=DIR, the folder "
                             f"holding {BATCHES_DIRNAME}/, or {manual_recipe(data_dir)}")
        return found
    for root in candidate_dirs(data_dir):
        found = _batches_dir(root)
        if found is not None:
            return found
    return None


def manual_recipe(target: str | os.PathLike[str]) -> str:
    """How to fetch CIFAR-10 by hand into `target`."""
    return (f"to fetch it by hand: curl -LO {ARCHIVE_URL} && mkdir -p {target} && "
            f"tar xzf cifar-10-python.tar.gz -C {target}")


def _created_dirs(path: Path) -> list[Path]:
    """The folders `path.mkdir(parents=True)` would create, deepest first (to remove them again on failure)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing


def download(target_root: Path, progress: Callable[[int, int], None] | None = None, timeout: float = 30.0) -> Path:
    """Fetch the official archive, check its published md5, unpack into target_root.

    A failed download removes the folders it created, so no empty cache is left behind.
    """
    created = _created_dirs(target_root)
    try:
        return _download(target_root, progress, timeout)
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()  # only if empty: never removes anything the download did not create
            except OSError:
                break
        raise


def _download(target_root: Path, progress: Callable[[int, int], None] | None, timeout: float) -> Path:
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
                    raise InputError(f"{ARCHIVE_URL}: md5 {digest.hexdigest()} is not the published {ARCHIVE_MD5}; retry, or pass data_dir= a local copy")
                tmp.seek(0)
                with tarfile.open(fileobj=tmp, mode="r:gz") as tar:
                    tar.extractall(target_root, filter="data")
    except OSError as exc:
        raise InputError(f"download of {ARCHIVE_URL} (about {ARCHIVE_MB} MB) failed ({exc})") from None
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
    env = "" if os.environ.get(DATA_DIR_ENV) else f" (${DATA_DIR_ENV} unset)"
    missing = f"CIFAR-10 ({BATCHES_DIRNAME}/{TEST_BATCH}) not found in {looked}{env}"
    if not allow_download:
        raise InputError(f"{missing} and allow_download=False; pass data_dir=DIR or set {DATA_DIR_ENV} to the folder "
                         f"holding {BATCHES_DIRNAME}/, or {manual_recipe(default_cache_dir())}")
    try:
        return download(default_cache_dir(), progress=progress)
    except InputError as exc:
        raise InputError(f"{missing}; {exc}; {manual_recipe(default_cache_dir())}, or pass data_dir=DIR") from None


def load_split(split: str = "test", data_dir: str | os.PathLike[str] | None = None, allow_download: bool = True,
               progress: Callable[[int, int], None] | None = None) -> Split:
    """The CIFAR-10 test split (10,000 images) or train split (50,000) as uint8 arrays."""
    root = locate(data_dir, allow_download=allow_download, progress=progress)
    names: Iterable[str] = (TEST_BATCH,) if split == "test" else TRAIN_BATCHES
    parts = [read_batch(root / name) for name in names]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return Split(images=images, labels=labels, source=root, md5=_md5_files(root / name for name in names))


def _md5_files(paths: Iterable[Path]) -> str:
    digest = hashlib.md5()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def to_float_tensor(images: np.ndarray):
    """torchvision's ToTensor for CHW uint8: float32 in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255)


def load_npz_sample(path: str | os.PathLike[str]) -> Split:
    """A small committed sample (tests/data) stored as .npz with `images` and `labels`."""
    with np.load(path, allow_pickle=False) as z:
        return Split(images=z["images"], labels=z["labels"].astype(np.int64), source=Path(path))
