"""bnstrip.io.checkpoint: round trips in both formats, unwrapping, prefixes, metadata, atomic writes, refusals."""
from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from bnstrip.io.checkpoint import (
    check_output_path,
    detect_format,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
    unwrap_state_dict,
)
from bnstrip.cli import main
from bnstrip.errors import InputError
from bnstrip.homework.models import SmallNetTest
from hostile_corpus import light_smallnet_state


def mixed_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=gen),
        "conv.bias": torch.randn(4, generator=gen).double(),
        "bn.weight": torch.randn(4, generator=gen).half(),
        "bn.bias": torch.randn(4, generator=gen).bfloat16(),
        "bn.num_batches_tracked": torch.tensor(17),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("suffix, fmt", [(".pt", "torch-zip"), (".safetensors", "safetensors")])
def test_round_trip_keeps_every_tensor_bit_for_bit(tmp_path: Path, suffix: str, fmt: str) -> None:
    state = mixed_state()
    path = save_checkpoint(state, tmp_path / f"model{suffix}", metadata={"note": "round trip"})
    loaded = load_checkpoint(path)
    assert loaded.format == fmt == detect_format(path)
    assert_same(loaded.state_dict, state)
    assert loaded.sha256 == sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.unwrapped == []
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temp file may remain"


def test_legacy_torch_format_loads(tmp_path: Path) -> None:
    state = {k: v for k, v in mixed_state().items() if k != "empty"}
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded.format == "torch-legacy"
    assert_same(loaded.state_dict, state)


def test_safetensors_metadata_is_written_and_read_back(tmp_path: Path) -> None:
    meta = {"source_sha256": "ab" * 32, "eps": "1e-05", "folded_pairs": "conv1.0+conv1.1"}
    path = save_checkpoint({"w": torch.ones(2)}, tmp_path / "m.safetensors", metadata=meta)
    with safe_open(str(path), framework="pt") as f:  # read by the library itself, not by bnstrip
        assert f.metadata() == meta
    assert load_checkpoint(path).metadata == meta


def test_tied_weights_are_saved_to_safetensors(tmp_path: Path) -> None:
    shared = torch.randn(3, 3)
    path = save_checkpoint({"embed.weight": shared, "head.weight": shared}, tmp_path / "tied.safetensors")
    loaded = load_checkpoint(path).state_dict
    assert torch.equal(loaded["embed.weight"], shared) and torch.equal(loaded["head.weight"], shared)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_training_checkpoints_are_unwrapped_and_prefixes_stripped(tmp_path: Path, wrapper: str, prefix: str) -> None:
    state = mixed_state()
    optimizer = {"state": {0: {"momentum_buffer": torch.randn(4)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    blob = {"epoch": 7, "best_acc": 0.91, wrapper: {prefix + k: v for k, v in state.items()}, "optimizer": optimizer}
    torch.save(blob, tmp_path / "train.pt")
    loaded = load_checkpoint(tmp_path / "train.pt")
    assert_same(loaded.state_dict, state)
    expected_notes = [f"unwrapped '{wrapper}'"] + [f"stripped prefix '{p}.'" for p in prefix.split(".") if p]
    assert loaded.unwrapped == expected_notes


def test_prefix_is_kept_when_not_every_key_has_it() -> None:
    state = {"module.a": torch.ones(1), "b": torch.ones(1)}
    assert unwrap_state_dict(state, Path("x.pt")) == (state, [])


@pytest.mark.parametrize("obj, message", [
    (torch.ones(3), "top-level object is a Tensor"),
    ([torch.ones(3)], "top-level object is a list"),
    ({}, "empty dict"),
    ({"w": torch.ones(1), "epoch": 3}, "entry 'epoch' is not a tensor (int)"),
    ({1: torch.ones(1)}, "key 1 is a int"),
    ({"state_dict": {"w": torch.ones(1), "step": "x"}}, "entry 'step' is not a tensor"),
])
def test_objects_that_are_not_state_dicts_are_refused(obj, message: str) -> None:
    with pytest.raises(InputError) as info:
        unwrap_state_dict(obj, Path("ckpt.pt"))
    assert str(info.value).startswith("ckpt.pt: ") and message in str(info.value) and "\n" not in str(info.value)


def test_format_comes_from_the_bytes(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(2)}, str(tmp_path / "b.pt"))
    assert detect_format(tmp_path / "a.safetensors") == "torch-zip"
    assert detect_format(tmp_path / "b.pt") == "safetensors"


def test_save_replaces_only_with_force_and_never_an_input(tmp_path: Path) -> None:
    out = save_checkpoint({"w": torch.ones(2)}, tmp_path / "out.pt")
    with pytest.raises(InputError, match="pass force=True"):
        save_checkpoint({"w": torch.zeros(2)}, out)
    assert torch.equal(load_checkpoint(out).state_dict["w"], torch.ones(2))
    save_checkpoint({"w": torch.zeros(2)}, out, force=True)
    assert torch.equal(load_checkpoint(out).state_dict["w"], torch.zeros(2))
    (tmp_path / "link.pt").symlink_to(out)
    for target in (out, tmp_path / "link.pt"):
        with pytest.raises(InputError, match="output is the input file"):
            check_output_path(target, [out], force=True)
    with pytest.raises(InputError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "o.pt", [], force=False)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = save_checkpoint({"w": torch.ones(2)}, tmp_path / "out.pt")
    before = out.read_bytes()

    def disk_full(obj, f) -> None:
        f.write(b"PK\x03\x04 partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(InputError, match=rf"out.pt: no space left on {tmp_path}"):
        save_checkpoint({"w": torch.zeros(2)}, out, force=True)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]


def test_a_failed_safetensors_write_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from bnstrip.io import write

    def disk_full(tensors, out, metadata) -> None:
        out.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(write, "stream_safetensors", disk_full)
    with pytest.raises(InputError, match=rf"no space left on {tmp_path}"):
        save_checkpoint({"w": torch.zeros(2)}, tmp_path / "o.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_unwrapping_and_writes_a_strict_state_dict(tmp_path: Path, random_smallnet_state) -> None:
    state = light_smallnet_state(random_smallnet_state)
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "train.pt")
    result = CliRunner().invoke(main, ["fuse", str(tmp_path / "train.pt"), str(tmp_path / "test.safetensors")])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [f"bnstrip: warning: {tmp_path / 'train.pt'}: unwrapped 'model'",
                                          f"bnstrip: warning: {tmp_path / 'train.pt'}: stripped prefix 'module.'"]
    loaded = load_checkpoint(tmp_path / "test.safetensors")
    SmallNetTest().load_state_dict(loaded.state_dict, strict=True)
    assert loaded.metadata["source_sha256"] == sha256_file(tmp_path / "train.pt")


def test_output_names_near_name_max_get_a_temp_name_that_fits(tmp_path: Path) -> None:
    """A 250-byte OUT is written (its temp name is cut to fit NAME_MAX); a 256-byte one is refused before any work."""
    out = tmp_path / ("a" * 247 + ".pt")
    save_checkpoint({"w": torch.ones(2)}, out)
    assert torch.equal(load_checkpoint(out).state_dict["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    with pytest.raises(InputError, match="over this file system's 255-byte limit"):
        check_output_path(tmp_path / ("b" * 253 + ".pt"), [], force=False)


@pytest.mark.parametrize("name, fmt", [("m.pt", "torch"), ("m.PTH", "torch"), ("m.bin", "torch"), ("m.ckpt", "torch"),
                                       ("smallNetSaved", "torch"), ("m.safetensors", "safetensors")])
def test_output_format_from_the_suffix(name: str, fmt: str) -> None:
    from bnstrip.io.write import output_format

    assert output_format(name) == fmt


def test_unknown_output_suffix_is_refused_naming_the_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"does not write \.onnx files; name the output with one of \.pt, \.pth"):
        save_checkpoint({"w": torch.ones(2)}, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_check_output_paths_checks_all_before_writing(tmp_path: Path) -> None:
    from bnstrip.io.write import check_output_paths

    (tmp_path / "out.pt.bnstrip.json").write_text("{}")
    with pytest.raises(InputError, match="out.pt.bnstrip.json: output exists"):
        check_output_paths([tmp_path / "out.pt", tmp_path / "out.pt.bnstrip.json"], [], force=False)
    assert check_output_paths([tmp_path / "out.pt", tmp_path / "out.pt.bnstrip.json"], [], force=True)


def test_legacy_and_zip_storages_must_be_backed_by_the_file(tmp_path: Path) -> None:
    """The static storage checks agree with torch on good files of both formats (incl. views of one storage)."""
    base = torch.arange(10, dtype=torch.float32)
    state = {"a": base[:4], "b": base[4:], "c": torch.ones(2, dtype=torch.float16)}
    for kwargs in ({}, {"_use_new_zipfile_serialization": False}):
        torch.save(state, tmp_path / "views.pt", **kwargs)
        loaded = load_checkpoint(tmp_path / "views.pt").state_dict
        assert all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.parametrize("renameat2", [True, False])
def test_no_replace_placement_with_and_without_renameat2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         renameat2: bool) -> None:
    """Without force the file is placed by renameat2(RENAME_NOREPLACE) or, where that is missing, a hard link."""
    import bnstrip.io.write as write_module

    if not renameat2:
        monkeypatch.setattr(write_module, "_renameat2_noreplace", lambda source, target: False)
    out = save_checkpoint({"w": torch.ones(3)}, tmp_path / "out.pt")
    assert torch.equal(load_checkpoint(out).state_dict["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"] and out.stat().st_nlink == 1
    racer = tmp_path / "raced.pt"
    with pytest.raises(InputError, match="raced.pt: another file appeared"):
        save_checkpoint({"w": torch.ones(3)}, racer, before_replace=lambda tmp: racer.write_bytes(b"theirs"))
    assert racer.read_bytes() == b"theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["out.pt", "raced.pt"]
