"""bnstrip.io.pt2: hostile .pt2 files are refused before torch runs anything from them (generated at test time)."""
from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import hostile_pt2
import pytest
import torch
from torch import nn

from bnstrip.errors import InputError
from bnstrip.io.pt2 import is_pt2, load_program


class _Payload:
    """Unpickling this runs `os.system` (a canary file appears if it ever runs)."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        return os.system, (f"touch {self.canary}",)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    path = tmp_path_factory.mktemp("pt2") / "good.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), path)
    return path


def _rewrite(src: Path, dst: Path, change) -> Path:
    """Copy the archive record by record (stored, as torch writes), letting `change(name, bytes)` edit records."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
    return dst


def _torch_save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _json_edit(edit):
    def change(name, data):
        if name.endswith("models/model.json"):
            doc = json.loads(data)
            edit(doc)
            return json.dumps(doc).encode()
        return data
    return change


def test_good_program_loads(good):
    assert is_pt2(good)
    program = load_program(good)
    assert isinstance(program, torch.export.ExportedProgram)


def test_pickle_payload_in_sample_inputs_is_refused(good, tmp_path):
    canary = tmp_path / "canary"
    evil = _torch_save_bytes(((_Payload(canary),), {}))
    path = _rewrite(good, tmp_path / "evil.pt2",
                    lambda n, d: evil if n.endswith("sample_inputs/model.pt") else d)
    with pytest.raises(InputError, match=r"refused.*os\.system|posix\.system"):
        load_program(path)
    assert not canary.exists()


def test_pickled_weight_payload_is_refused(good, tmp_path):
    canary = tmp_path / "canary"

    def change(name, data):
        if name.endswith("model_weights_config.json"):
            doc = json.loads(data)
            first = next(iter(doc["config"].values()))
            first["use_pickle"] = True
            return json.dumps(doc).encode()
        if name.endswith("data/weights/weight_0"):
            return _torch_save_bytes(_Payload(canary))
        return data

    with pytest.raises(InputError, match="refused"):
        load_program(_rewrite(good, tmp_path / "evil.pt2", change))
    assert not canary.exists()


def test_sympy_expression_payload_is_refused(good, tmp_path):
    canary = tmp_path / "canary"

    def edit(doc):
        doc["graph_module"]["graph"]["sym_int_values"]["s0"] = {
            "as_expr": {"expr_str": f"__import__('os').system('touch {canary}')", "hint": None}}

    with pytest.raises(InputError, match="shape expression"):
        load_program(_rewrite(good, tmp_path / "evil.pt2", _json_edit(edit)))
    assert not canary.exists()


def test_graph_calling_python_code_is_refused(good, tmp_path):
    def edit(doc):
        doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"

    with pytest.raises(InputError, match="not a torch operator"):
        load_program(_rewrite(good, tmp_path / "evil.pt2", _json_edit(edit)))


def test_code_in_a_graph_name_is_refused(good, tmp_path):
    def edit(doc):
        doc["graph_module"]["graph"]["nodes"][0]["outputs"][0]["as_tensor"]["name"] = "x = __import__('os')"

    with pytest.raises(InputError, match="undefined value"):
        load_program(_rewrite(good, tmp_path / "evil.pt2", _json_edit(edit)))


def test_weight_larger_than_its_record_is_refused(good, tmp_path):
    path = _rewrite(good, tmp_path / "short.pt2",
                    lambda n, d: d[:8] if n.endswith("data/weights/weight_0") else d)
    with pytest.raises(InputError, match="needs .* bytes but its record"):
        load_program(path)


def test_storage_claim_beyond_file_is_refused(good, tmp_path):
    def change(name, data):
        if name.endswith("model_weights_config.json"):
            doc = json.loads(data)
            first = next(iter(doc["config"].values()))
            first["tensor_meta"]["sizes"][0] = {"as_int": 2 ** 40}
            return json.dumps(doc).encode()
        return data

    with pytest.raises(InputError, match="needs .* bytes"):
        load_program(_rewrite(good, tmp_path / "huge.pt2", change))


@pytest.mark.parametrize("cut", [0.2, 0.6, 0.95])
def test_truncated_file_is_refused(good, tmp_path, cut):
    data = good.read_bytes()
    path = tmp_path / "cut.pt2"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(InputError) as info:
        load_program(path)
    assert "\n" not in str(info.value)


def test_compressed_records_are_refused(good, tmp_path):
    path = tmp_path / "deflated.pt2"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    with pytest.raises(InputError, match="compressed|corrupt|crafted"):
        load_program(path)


def test_missing_graph_and_plain_checkpoint_are_refused(good, tmp_path):
    no_graph = _rewrite(good, tmp_path / "nograph.pt2", lambda n, d: None if n.endswith("models/model.json") else d)
    with pytest.raises(InputError, match="no program"):
        load_program(no_graph)
    ckpt = tmp_path / "weights.pt2"
    torch.save({"w": torch.zeros(2)}, ckpt)
    assert not is_pt2(ckpt)
    with pytest.raises(InputError, match="not an exported program"):
        load_program(ckpt)


def test_opaque_constant_is_refused(good, tmp_path):
    def change(name, data):
        if name.endswith("model_constants_config.json"):
            return json.dumps({"config": {"obj": {"path_name": "opaque_obj_0", "is_param": False,
                                                   "use_pickle": True, "tensor_meta": None}}}).encode()
        return data

    def add(src, dst):
        _rewrite(src, dst, change)
        with zipfile.ZipFile(dst, "a", zipfile.ZIP_STORED) as z:
            prefix = z.namelist()[0].split("/")[0]
            z.writestr(f"{prefix}/data/constants/opaque_obj_0", pickle.dumps(_Payload(tmp_path / "c")))
        return dst

    with pytest.raises(InputError, match="pickled Python"):
        load_program(add(good, tmp_path / "opaque.pt2"))
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- issue 17: parse, don't validate
# Each test below fails on the loader that validated the file and then gave it to torch.export.load.


def _cli(args: list[str]):
    from click.testing import CliRunner

    from bnstrip.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _refused_in_one_line(result, path: Path, *fragments: str) -> str:
    """Exit 2, nothing on stdout, one stderr line naming the file, the fragments and a fix."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in (path.name, "re-export", *fragments):
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_forward_arg_names_never_become_code(good, tmp_path):
    """Item 1: the file's forward_arg_names are not used; bnstrip generates the names torch pastes into forward."""
    canary = tmp_path / "canary"
    evil = hostile_pt2.code_in_forward_arg_names(good, tmp_path / "evil.pt2", canary)
    program = load_program(evil)
    x = program.example_inputs[0][0]
    assert program.module()(x).shape == (2, 4, 6, 6)
    assert program.module_call_graph[0].signature.forward_arg_names == ["arg_0"]
    result = _cli(["fuse", evil, tmp_path / "out.pt2", "--json"])
    assert result.exit_code == 0, result.output
    assert not canary.exists()


def test_models_record_twin_is_never_read(good, tmp_path):
    """Item 2: only models/model.json is the program; `models/model_json` (also "model" to torch) is ignored."""
    canary = tmp_path / "canary"
    both = hostile_pt2.models_record_twin(good, tmp_path / "both.pt2", canary, keep_real=True)
    program = load_program(both)
    assert program.module()(program.example_inputs[0][0]).shape == (2, 4, 6, 6)
    assert not canary.exists()
    twin_only = hostile_pt2.models_record_twin(good, tmp_path / "twin.pt2", canary, keep_real=False)
    result = _cli(["fuse", twin_only, tmp_path / "out.pt2"])
    assert result.exit_code == 2 and "no program models/model.json" in result.stderr
    assert not canary.exists() and not (tmp_path / "out.pt2").exists()


def test_file_op_call_target_is_refused_by_name(good, tmp_path):
    """Item 3: aten.from_file (with fill_ after it) is not an allowed op; the victim file is untouched."""
    victim = tmp_path / "victim.sh"
    victim.write_bytes(b"#!/bin/sh\necho hello\n")
    evil = hostile_pt2.file_op_target(good, tmp_path / "evil.pt2", victim)
    _refused_in_one_line(_cli(["fuse", evil, tmp_path / "out.pt2"]), evil, "aten.from_file.default")
    _refused_in_one_line(_cli(["verify", good, evil]), evil, "aten.from_file.default")
    assert victim.read_bytes() == b"#!/bin/sh\necho hello\n"


def test_empty_record_claiming_gigabytes_is_refused_before_allocating(good, tmp_path):
    """Item 4: a 0-byte record whose metadata claims 1.6 GB is refused from the sizes alone."""
    evil = hostile_pt2.zero_byte_record(good, tmp_path / "evil.pt2", 400_000_000)
    assert evil.stat().st_size < 100_000
    line = _refused_in_one_line(_cli(["fuse", evil, tmp_path / "out.pt2"]), evil, "needs 1,600,000,000 bytes",
                                "holds 0")
    assert "weight" in line


def test_print_op_never_reaches_stdout(good, tmp_path):
    """Item 5: aten._print is refused; --json stdout holds nothing forged (refusal: empty; success: one object)."""
    evil = hostile_pt2.print_op(good, tmp_path / "evil.pt2")
    result = _cli(["fuse", evil, tmp_path / "out.pt2", "--json"])
    _refused_in_one_line(result, evil, "aten._print.default")
    assert "folded 3 pairs" not in result.output
    fine = _cli(["fuse", good, tmp_path / "out.pt2", "--json"])
    assert fine.exit_code == 0, fine.output
    assert isinstance(json.loads(fine.stdout), dict)


def test_no_process_wide_patch_and_no_unpickling(good, monkeypatch):
    """Item 12: torch.load is never replaced, and torch.export.load never unpickles (the canonical archive holds
    no pickle); the sample inputs are read by bnstrip's checkpoint path and attached to the program."""
    original_load, original_export_load = torch.load, torch.export.load
    inside: list[bool] = []
    seen: list[str] = []

    def spy_load(*args, **kwargs):
        seen.append("inside torch.export.load" if inside else f"weights_only={kwargs.get('weights_only')}")
        return original_load(*args, **kwargs)

    def spy_export_load(*args, **kwargs):
        assert torch.load is spy_load, "torch.load was replaced while torch.export.load ran"
        inside.append(True)
        try:
            return original_export_load(*args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(torch, "load", spy_load)
    monkeypatch.setattr(torch.export, "load", spy_export_load)
    program = load_program(good)
    assert torch.load is spy_load
    assert seen == ["weights_only=True"]  # bnstrip's own read of the sample inputs, nothing else
    assert program.example_inputs[0][0].shape == (2, 3, 8, 8)


def test_stored_guard_code_is_not_carried_over(good, tmp_path):
    """Item 12: the file's guard code is dropped by the re-emit (torch never receives it), not cleared afterwards."""
    canary = tmp_path / "canary"
    program = load_program(hostile_pt2.guard_code(good, tmp_path / "guards.pt2", canary))
    assert program._guards_code == []
    program.module()(program.example_inputs[0][0])
    assert not canary.exists()


def test_input_claim_without_sample_inputs_is_refused_before_allocating(good, tmp_path):
    """With no saved example inputs, bnstrip seeds inputs of the program's own input specs: a 2**40-element claim
    is refused (CLI, exit 2, one line) instead of allocated."""
    def edit(doc):
        graph = doc["graph_module"]["graph"]
        x = graph["nodes"][0]["inputs"][0]["arg"]["as_tensor"]["name"]
        graph["tensor_values"][x]["sizes"][0] = {"as_int": 2 ** 34}
        graph["tensor_values"][x]["strides"] = [{"as_int": 1}] * 4

    evil = hostile_pt2.edit_program(good, tmp_path / "evil.pt2", edit)
    evil = hostile_pt2.rewrite(evil, tmp_path / "nosample.pt2",
                               lambda n, d: b"" if n == "data/sample_inputs/model.pt" else d)
    result = _cli(["fuse", evil, tmp_path / "out.pt2"])
    assert result.exit_code == 2, result.output
    assert "claim" in result.stderr and "nosample.pt2" in result.stderr and len(result.stderr.strip().splitlines()) == 1
