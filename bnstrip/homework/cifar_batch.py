"""Read one CIFAR-10 python batch (`test_batch`, `data_batch_N`) from an untrusted file, within fixed bounds.

A dataset pickle can run code as easily as a checkpoint can, and an allowed global
can still allocate on the file's say-so (`numpy.ndarray((400000, 3072), 'u1')` from
a 200-byte file is 1.2 GB of uninitialised images).  So: the file must be a regular
file of at most MAX_BATCH_BYTES (10,000 images of 3,072 bytes, plus labels and
names), it is read into memory once and unpickled from there (a length claim beyond
the file cannot allocate), and the unpickler admits only numpy's array
reconstruction, each call checked: arrays are rebuilt empty and filled only from
bytes in the file, dtypes are plain numbers, `_codecs.encode` only re-encodes
latin-1.  The result must be uint8 (N, 3072) with 1 <= N <= 10,000 and N labels in
0..9, which is what verify needs.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from bnstrip.errors import InputError, printable

IMAGES_PER_BATCH = 10_000
IMAGE_BYTES = 3 * 32 * 32
CLASSES = 10
MAX_BATCH_BYTES = IMAGES_PER_BATCH * IMAGE_BYTES + (1 << 20)
"""An official batch is 31,035,526 bytes: 30,720,000 of pixels, the rest labels, file names and pickle framing."""


class _NdarrayClass:
    """Stands for numpy.ndarray in the pickle: usable as _reconstruct's subtype, never callable (that would allocate)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError("the batch calls numpy.ndarray(...) directly, allocating memory the file does not hold")


_NDARRAY = _NdarrayClass()


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's array reconstruction, allowed only the empty start that pickle then fills from the file's bytes."""
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError("the batch rebuilds an array of a type other than numpy.ndarray")
    if not (isinstance(shape, tuple) and all(type(d) is int and 0 <= d <= 1 for d in shape)):
        raise pickle.UnpicklingError(f"the batch starts an array of shape {shape!r:.60}, not an empty one")
    return np.ndarray((0,), dtype="b")  # what numpy's _reconstruct(ndarray, (0,), b"b") builds


def _dtype(spec: Any, *args: Any) -> np.dtype:
    """numpy.dtype for plain numbers only (no object or structured dtypes)."""
    if not isinstance(spec, str) or len(spec) > 8:
        raise pickle.UnpicklingError(f"the batch asks for dtype {spec!r:.40}")
    try:
        dtype = np.dtype(spec)
    except TypeError:
        raise pickle.UnpicklingError(f"the batch asks for an unknown dtype {spec!r:.40}") from None
    if dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"the batch asks for dtype {spec!r:.40}, which is not a plain number")
    return np.dtype(spec, *[a for a in args if isinstance(a, bool)][:2])


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """_codecs.encode as Python 3 pickles bytes at protocol 2: str -> latin-1 bytes, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("the batch calls _codecs.encode with something other than latin-1 text")
    return text.encode("latin-1")


def _empty_bytes(*args: Any) -> bytes:
    """bytes() as protocol 2 pickles an empty buffer; bytes(N) would allocate N, so nothing else."""
    if args:
        raise pickle.UnpicklingError("the batch calls bytes(...) with arguments, which could allocate what the file does not hold")
    return b""


_ALLOWED: dict[tuple[str, str], Any] = {
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _encode,
}


class _BatchUnpickler(pickle.Unpickler):
    """Admits the checked stand-ins of numpy array reconstruction above and nothing else (no os.system, no eval)."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR-10 batch")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a CIFAR-10 batch has no persistent ids")


def _fix() -> str:
    return "re-download CIFAR-10 or pass data_dir=DIR pointing at a good copy"


def _read_bounded(path: Path) -> bytes:
    from bnstrip.io.sniff import open_regular_file

    with open_regular_file(path) as f:
        data = f.read(MAX_BATCH_BYTES + 1)
    if len(data) > MAX_BATCH_BYTES:
        raise InputError(f"{printable(path)}: is over {MAX_BATCH_BYTES:,} bytes, larger than a CIFAR-10 batch of "
                         f"{IMAGES_PER_BATCH:,} images can be; {_fix()}")
    return data


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python-batch file as (uint8 images N x 3 x 32 x 32, int64 labels); InputError naming the file otherwise."""
    path = Path(path)
    shown = printable(path)
    raw = _read_bounded(path)
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except MemoryError:
        raise InputError(f"{shown}: not a readable CIFAR-10 python batch (it asks for more memory than a batch needs); {_fix()}") from None
    except Exception as exc:  # noqa: BLE001 - pickle raises anything (LookupError, OverflowError, ...) for crafted input
        detail = printable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:160]
        raise InputError(f"{shown}: not a readable CIFAR-10 python batch ({type(exc).__name__}: {detail}); {_fix()}") from None
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise InputError(f"{shown}: CIFAR-10 batch lacks 'data'/'labels'; {_fix()}")
    data, labels = batch["data"], batch["labels"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == IMAGE_BYTES
            and 1 <= data.shape[0] <= IMAGES_PER_BATCH):
        shape = data.shape if isinstance(data, np.ndarray) else type(data).__name__
        raise InputError(f"{shown}: CIFAR-10 batch data is {getattr(data, 'dtype', '')} {shape}; expected uint8 (N, 3072) "
                         f"with 1 <= N <= {IMAGES_PER_BATCH:,}; {_fix()}")
    if not (isinstance(labels, list) and len(labels) == data.shape[0]
            and all(type(x) is int and 0 <= x < CLASSES for x in labels)):
        raise InputError(f"{shown}: CIFAR-10 batch has {data.shape[0]} images but its labels are not {data.shape[0]} "
                         f"integers in 0..{CLASSES - 1}; {_fix()}")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)
