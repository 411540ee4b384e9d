"""bnstrip.io.safetensors_check for every safetensors bnstrip reads: checkpoints and `verify --inputs` (issue 17
items 8 and 10).  Each payload is written by hand into tmp_path; the old code read them with no checks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from bnstrip.cli import main
from bnstrip.cli.program import _load_inputs
from bnstrip.errors import InputError
from bnstrip.io.checkpoint import load_checkpoint


def _raw(path: Path, header: dict, data: bytes = b"") -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def _many_empty(path: Path, count: int) -> Path:
    return _raw(path, {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(count)})


def _huge_header(path: Path) -> Path:
    return _raw(path, {"__metadata__": {"pad": "x" * (17 << 20)}, "x": {"dtype": "F32", "shape": [1],
                                                                          "data_offsets": [0, 4]}}, b"\0" * 4)


def _overlapping(path: Path) -> Path:
    return _raw(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)


def _huge_empty_dim(path: Path) -> Path:
    return _raw(path, {"x": {"dtype": "F32", "shape": [1 << 63, 0], "data_offsets": [0, 0]}})


HOSTILE = {"30000 empty entries": (_many_empty, "over bnstrip's limit"), "17 MiB header": (_huge_header, "16,777,216"),
           "overlapping offsets": (_overlapping, "overlaps"), "dim 2**63 of an empty tensor": (_huge_empty_dim, "more than torch can index")}


def _make(name: str, tmp_path: Path) -> Path:
    make, _ = HOSTILE[name]
    return make(tmp_path / "x.safetensors") if make is not _many_empty else make(tmp_path / "x.safetensors", 30_000)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_inputs_file_goes_through_the_checkpoint_validator(name: str, tmp_path: Path) -> None:
    path = _make(name, tmp_path)
    with pytest.raises(InputError) as exc:
        _load_inputs(str(path))
    text = str(exc.value)
    assert "\n" not in text and text.startswith(str(path)) and HOSTILE[name][1] in text and "re-" in text, text


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_checkpoints_refuse_the_same_files(name: str, tmp_path: Path) -> None:
    path = _make(name, tmp_path)
    with pytest.raises(InputError, match=HOSTILE[name][1]):
        load_checkpoint(path)


def test_valid_inputs_file_still_loads_in_key_order(tmp_path: Path) -> None:
    save_file({"b": torch.ones(2), "a": torch.arange(3.0)}, str(tmp_path / "in.safetensors"))
    a, b = _load_inputs(str(tmp_path / "in.safetensors"))
    assert torch.equal(a, torch.arange(3.0)) and torch.equal(b, torch.ones(2))


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("programs")
    program = torch.export.export(torch.nn.Linear(3, 2).eval(), (torch.randn(1, 3),))
    torch.export.save(program, folder / "a.pt2")
    torch.export.save(program, folder / "b.pt2")
    return folder / "a.pt2", folder / "b.pt2"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_verify_inputs_refusal_is_one_line_exit_2(name: str, tmp_path: Path, programs: tuple[Path, Path]) -> None:
    path = _make(name, tmp_path)
    result = CliRunner().invoke(main, ["verify", str(programs[0]), str(programs[1]), "--inputs", str(path)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and str(path) in lines[0], result.stderr


def test_float8_checkpoint_loads_and_fuse_keep_says_which_dtype(tmp_path: Path) -> None:
    """F8_E4M3 loads (the finiteness check widens it); folding in float8 is refused by name with the fix."""
    from bnstrip.core.foldmath import all_finite
    from bnstrip.pipeline import _converted

    f8 = torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn)
    save_file({"w": f8}, str(tmp_path / "f8.safetensors"))
    state = load_checkpoint(tmp_path / "f8.safetensors").state_dict
    assert all_finite(state["w"]) and not all_finite(torch.tensor([float("nan")]).to(torch.float8_e4m3fn))
    with pytest.raises(InputError, match=r"tensor w is float8_e4m3fn.*dtype='float32'"):
        _converted(state, "keep", "f8.safetensors")
    assert _converted(state, "float32")["w"].dtype == torch.float32
