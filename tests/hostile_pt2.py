"""Hostile `.pt2` files (issue 17 items 1-5), generated at test time from a program torch.export.save wrote.

The .pt2 part of the hostile corpus: each builder copies a good archive record by record (stored, as torch
writes) and plants one attack. Payloads are real against a loader that trusts the file (torch.export.load on
the file itself): they create `canary` or write into `victim`, both inside the test's temporary folder.
"""
from __future__ import annotations

import copy
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

Edit = Callable[[dict[str, Any]], None]


def good_program(path: Path) -> Path:
    """A conv+BN program saved by torch.export.save (with its example inputs): what every case starts from."""
    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), path)
    return path


def rewrite(src: Path, dst: Path, change: Callable[[str, bytes], bytes | None],
            extra: dict[str, bytes] | None = None) -> Path:
    """Copy the archive, letting `change(short_name, bytes)` edit (or drop, with None) each record; add `extra`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        prefix = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            data = change(info.filename.split("/", 1)[1], zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
        for name, data in (extra or {}).items():
            zout.writestr(f"{prefix}/{name}", data)
    return dst


def program_doc(src: Path) -> dict[str, Any]:
    with zipfile.ZipFile(src) as z:
        return json.loads(next(z.read(n) for n in z.namelist() if n.endswith("/models/model.json")))


def edit_program(src: Path, dst: Path, edit: Edit) -> Path:
    """A copy of `src` whose models/model.json went through `edit`."""
    def change(name: str, data: bytes) -> bytes:
        if name == "models/model.json":
            doc = json.loads(data)
            edit(doc)
            return json.dumps(doc).encode()
        return data
    return rewrite(src, dst, change)


def _graph(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["graph_module"]["graph"]


def _user_input(doc: dict[str, Any]) -> str:
    spec = next(s for s in doc["graph_module"]["signature"]["input_specs"] if "user_input" in s)
    return spec["user_input"]["arg"]["as_tensor"]["name"]


def code_in_forward_arg_names(src: Path, dst: Path, canary: Path) -> Path:
    """Item 1: torch pastes forward_arg_names into `def forward(self, ...)`; a default value runs at def time."""
    def edit(doc: dict[str, Any]) -> None:
        signature = doc["graph_module"]["module_call_graph"][0]["signature"]
        signature["forward_arg_names"] = [f"x=__import__('os').system('touch {canary}')"]
    return edit_program(src, dst, edit)


def sympy_payload(canary: Path) -> str:
    return f"__import__('os').system('touch {canary}') + 2"


def models_record_twin(src: Path, dst: Path, canary: Path, keep_real: bool) -> Path:
    """Item 2: torch loads every record under models/ and names it by cutting 5 characters, so `models/model_json`
    is program "model" too; its input size is an expression sympy evaluates."""
    twin = program_doc(src)
    size = _graph(twin)["tensor_values"][_user_input(twin)]["sizes"]
    size[0] = {"as_expr": {"expr_str": sympy_payload(canary), "hint": {"as_int": 2}}}
    return rewrite(src, dst, lambda n, d: d if keep_real or n != "models/model.json" else None,
                   extra={"models/model_json": json.dumps(twin).encode()})


def _tensor_meta(doc: dict[str, Any], dtype: int, size: int) -> dict[str, Any]:
    meta = copy.deepcopy(_graph(doc)["tensor_values"][_user_input(doc)])
    meta.update(dtype=dtype, sizes=[{"as_int": size}], strides=[{"as_int": 1}], storage_offset={"as_int": 0})
    return meta


def file_op_target(src: Path, dst: Path, victim: Path) -> Path:
    """Item 3: aten.from_file maps `victim` shared; fill_ then writes into it."""
    def edit(doc: dict[str, Any]) -> None:
        graph = _graph(doc)
        graph["tensor_values"]["mapped"] = _tensor_meta(doc, 1, victim.stat().st_size)
        graph["tensor_values"]["filled"] = _tensor_meta(doc, 1, victim.stat().st_size)
        graph["nodes"][:0] = [
            {"target": "torch.ops.aten.from_file.default", "name": "mapped", "metadata": {},
             "inputs": [{"name": "filename", "arg": {"as_string": str(victim)}, "kind": 1},
                        {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                        {"name": "size", "arg": {"as_int": victim.stat().st_size}, "kind": 1},
                        {"name": "dtype", "arg": {"as_scalar_type": 1}, "kind": 2}],
             "outputs": [{"as_tensor": {"name": "mapped"}}]},
            {"target": "torch.ops.aten.fill_.Scalar", "name": "filled", "metadata": {},
             "inputs": [{"name": "self", "arg": {"as_tensor": {"name": "mapped"}}, "kind": 1},
                        {"name": "value", "arg": {"as_int": 65}, "kind": 1}],
             "outputs": [{"as_tensor": {"name": "filled"}}]}]
    return edit_program(src, dst, edit)


def zero_byte_record(src: Path, dst: Path, elements: int) -> Path:
    """Item 4: a weight record emptied while its metadata claims `elements` float32 values."""
    with zipfile.ZipFile(src) as z:
        name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(z.read(name))
    first = next(iter(config["config"].values()))
    meta = first["tensor_meta"]
    meta.update(sizes=[{"as_int": elements}], strides=[{"as_int": 1}], storage_offset={"as_int": 0}, dtype=7)
    record = f"data/weights/{first['path_name']}"

    def change(short: str, data: bytes) -> bytes:
        if short == "data/weights/model_weights_config.json":
            return json.dumps(config).encode()
        return b"" if short == record else data
    return rewrite(src, dst, change)


def shape_expression(src: Path, dst: Path, expr: str) -> Path:
    """Item 4: the input's batch size is `expr` (9**9**9 and friends hang or crawl in sympy)."""
    def edit(doc: dict[str, Any]) -> None:
        _graph(doc)["tensor_values"][_user_input(doc)]["sizes"][0] = {"as_expr": {"expr_str": expr, "hint": None}}
    return edit_program(src, dst, edit)


FORGED = "\x1b[2K\rfolded 3 pairs, all fine"


def print_op(src: Path, dst: Path) -> Path:
    """Item 5: aten._print writes its string raw to stdout (ESC sequences forge a success line)."""
    def edit(doc: dict[str, Any]) -> None:
        _graph(doc)["nodes"].insert(0, {"target": "torch.ops.aten._print.default", "name": "printed", "metadata": {},
                                        "inputs": [{"name": "s", "arg": {"as_string": FORGED}, "kind": 1}],
                                        "outputs": []})
    return edit_program(src, dst, edit)


def guard_code(src: Path, dst: Path, canary: Path) -> Path:
    """Item 12: guard code stored in the program (torch's loader keeps it; ep.module() could run it)."""
    def edit(doc: dict[str, Any]) -> None:
        doc["guards_code"] = [f"__import__('os').system('touch {canary}')"]
    return edit_program(src, dst, edit)
