"""CIFAR-10 loading: search order, restricted unpickling, md5-checked download, ToTensor semantics."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import bnstrip.homework.data as data
from bnstrip.errors import InputError

from conftest import write_cifar_batch


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch canary",))


def test_search_order_prefers_flag_then_env(tmp_path: Path, cifar_sample, monkeypatch) -> None:
    flag_dir, env_dir = tmp_path / "flag", tmp_path / "env"
    write_cifar_batch(flag_dir, cifar_sample.images[:10], cifar_sample.labels[:10])
    write_cifar_batch(env_dir, cifar_sample.images[:20], cifar_sample.labels[:20])
    monkeypatch.setenv("BNSTRIP_DATA_DIR", str(env_dir))
    assert len(data.load_split("test", flag_dir, allow_download=False)) == 10
    assert len(data.load_split("test", None, allow_download=False)) == 20
    # the batches folder itself is accepted too
    assert len(data.load_split("test", flag_dir / "cifar-10-batches-py", allow_download=False)) == 10


def test_images_are_chw_and_match_to_tensor(cifar_sample, fake_cifar_dir: Path) -> None:
    split = data.load_split("test", fake_cifar_dir, allow_download=False)
    assert split.images.shape == (200, 3, 32, 32) and split.images.dtype == np.uint8
    assert np.array_equal(split.labels, cifar_sample.labels)
    x = data.to_float_tensor(split.images[:2])
    # torchvision's ToTensor on an HWC uint8 image: permute to CHW, divide by 255
    hwc = torch.from_numpy(split.images[:2].transpose(0, 2, 3, 1).copy())
    assert torch.equal(x, hwc.permute(0, 3, 1, 2).float().div(255))


def test_malicious_batch_is_refused_without_running(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    batches = tmp_path / "evil" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "test_batch").write_bytes(pickle.dumps({"data": _RunsCode(), "labels": []}, protocol=2))
    with pytest.raises(InputError, match="posix.system|os.system|not allowed"):
        data.load_split("test", tmp_path / "evil", allow_download=False)
    assert not (tmp_path / "canary").exists()


def test_wrong_shapes_are_refused(tmp_path: Path) -> None:
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    (batches / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((3, 100), np.uint8), "labels": [0, 1, 2]}))
    with pytest.raises(InputError, match=r"expected uint8 \(N, 3072\)"):
        data.load_split("test", tmp_path, allow_download=False)


def test_missing_data_dir_flag_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a directory"):
        data.load_split("test", tmp_path / "nope", allow_download=False)


def _archive(cifar_sample) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        payload = pickle.dumps({"labels": [int(v) for v in cifar_sample.labels[:5]],
                                "data": cifar_sample.images[:5].reshape(5, -1)}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


class _Response(io.BytesIO):
    def __init__(self, body: bytes) -> None:
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body))}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture()
def isolated(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BNSTRIP_DATA_DIR", raising=False)
    return tmp_path


def test_download_checks_md5_and_unpacks_into_cache(isolated: Path, cifar_sample, monkeypatch) -> None:
    body = _archive(cifar_sample)
    monkeypatch.setattr(data, "ARCHIVE_MD5", hashlib.md5(body).hexdigest())
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout=None: _Response(body))
    seen = []
    split = data.load_split("test", progress=lambda done, total: seen.append((done, total)))
    assert len(split) == 5 and split.source == isolated / "cache" / "bnstrip" / "cifar-10-batches-py"
    assert seen and seen[-1] == (len(body), len(body))


def test_download_with_wrong_md5_is_refused(isolated: Path, cifar_sample, monkeypatch) -> None:
    body = _archive(cifar_sample)
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout=None: _Response(body))
    with pytest.raises(InputError, match="md5"):
        data.load_split("test")
    assert not (isolated / "cache" / "bnstrip" / "cifar-10-batches-py").exists()


def test_offline_failure_says_where_it_looked(isolated: Path, monkeypatch) -> None:
    def offline(url, timeout=None):
        raise OSError("Network is unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(InputError) as info:
        data.load_split("test")
    message = str(info.value)
    assert "\n" not in message and "BNSTRIP_DATA_DIR" in message and "cache" in message and "data" in message
    assert message.count("not found") == 1 and message.count("failed") == 1
    assert data.ARCHIVE_URL in message and "163 MB" in message and "curl -LO" in message and "tar xzf" in message
    assert not (isolated / "cache").exists(), "a failed download left an empty cache folder behind"


def test_failed_download_keeps_an_existing_cache_folder(isolated: Path, monkeypatch) -> None:
    cache = isolated / "cache" / "bnstrip"
    cache.mkdir(parents=True)
    (cache / "mine.txt").write_text("keep")
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout=None: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(InputError):
        data.load_split("test")
    assert (cache / "mine.txt").read_text() == "keep"


def test_explicit_data_dir_without_data_is_an_error_not_a_fallback(isolated: Path, fake_cifar_dir: Path,
                                                                   monkeypatch) -> None:
    monkeypatch.setenv("BNSTRIP_DATA_DIR", str(fake_cifar_dir))  # a good copy that must NOT be used
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout=None: pytest.fail("must not download"))
    empty = isolated / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no cifar-10-batches-py/test_batch here") as info:
        data.load_split("test", empty)
    assert str(empty) in str(info.value) and "data_dir=" in str(info.value)
    assert len(data.load_split("test")) == 200  # without data_dir, the environment's copy is found


def test_local_data_never_reports_download_progress_and_gives_md5(fake_cifar_dir: Path) -> None:
    calls = []
    split = data.load_split("test", fake_cifar_dir, progress=lambda done, total: calls.append(done))
    assert calls == []
    batch = fake_cifar_dir / "cifar-10-batches-py" / "test_batch"
    assert split.md5 == hashlib.md5(batch.read_bytes()).hexdigest()
