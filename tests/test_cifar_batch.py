"""bnstrip.homework.cifar_batch: real-format batches read exactly; crafted ones refused within bounds, by name."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from bnstrip.errors import InputError
from bnstrip.homework.cifar_batch import IMAGE_BYTES, MAX_BATCH_BYTES, read_batch


def write(path: Path, obj: object, protocol: int = 2) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_a_batch_round_trips_exactly(tmp_path: Path, protocol: int) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(7, IMAGE_BYTES), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, 10, size=7)]
    path = write(tmp_path / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": labels, "data": data,
                                           "filenames": [f"img_{i}.png" for i in range(7)]}, protocol)
    images, got = read_batch(path)
    assert images.shape == (7, 3, 32, 32) and np.array_equal(images.reshape(7, -1), data)
    assert got.dtype == np.int64 and got.tolist() == labels


def test_python2_style_batch_with_latin1_bytes(tmp_path: Path) -> None:
    """The official files were pickled by Python 2: the pixel buffer is a str read back as latin-1."""
    data = np.arange(2 * IMAGE_BYTES, dtype=np.uint32).astype(np.uint8).reshape(2, IMAGE_BYTES)
    state = (1, (2, IMAGE_BYTES), np.dtype("u1"), False, data.tobytes().decode("latin-1"))

    class Py2Array:
        def __reduce__(self):
            return (np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"), state)

    path = write(tmp_path / "test_batch", {"data": Py2Array(), "labels": [3, 4]})
    images, labels = read_batch(path)
    assert np.array_equal(images.reshape(2, -1), data) and labels.tolist() == [3, 4]


class Call:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("obj, fragment", [
    ({"data": Call(np.ndarray, ((400_000, 3072), "u1")), "labels": [0]}, "numpy.ndarray(...) directly"),
    ({"data": Call(np.dtype, ("O",)), "labels": [0]}, "not a plain number"),
    ({"data": Call(__import__("_codecs").encode, ("x", "rot13")), "labels": [0]}, "latin-1"),
    ({"data": np.zeros((2, IMAGE_BYTES), np.uint8), "labels": [0, -1]}, "integers in 0..9"),
    ({"data": np.zeros((2, IMAGE_BYTES), np.uint8), "labels": [0]}, "integers in 0..9"),
    ({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, "expected uint8 (N, 3072)"),
    ({"data": np.zeros((0, IMAGE_BYTES), np.uint8), "labels": []}, "1 <= N <= 10,000"),
    ([1, 2], "lacks 'data'/'labels'"),
])
def test_crafted_batches_are_refused_by_name(tmp_path: Path, obj: object, fragment: str) -> None:
    path = write(tmp_path / "test_batch", obj)
    with pytest.raises(InputError) as info:
        read_batch(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message, message


def test_length_claims_beyond_the_file_and_oversized_files(tmp_path: Path) -> None:
    claim = tmp_path / "claim"
    claim.write_bytes(b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"abc.")  # BINBYTES8 of 1 TiB
    with pytest.raises(InputError, match="not a readable CIFAR-10 python batch"):
        read_batch(claim)
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(MAX_BATCH_BYTES + 1)
    with pytest.raises(InputError, match="larger than a CIFAR-10 batch"):
        read_batch(big)
    with pytest.raises(InputError, match="is a directory"):
        read_batch(tmp_path)
