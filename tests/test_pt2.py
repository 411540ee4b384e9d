"""bnstrip.io.pt2: hostile .pt2 files are refused before torch runs anything from them (generated at test time)."""
from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

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
