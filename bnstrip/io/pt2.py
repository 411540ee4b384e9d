"""Load an exported program (`.pt2`, written by torch.export.save) without running code from the file.

A .pt2 is a torch zip archive holding a JSON graph, raw weight bytes and torch.save pickles
(sample inputs, and weights torch chose to pickle). torch.export.load trusts all of it: it
unpickles with weights_only=False, sympifies (evals) the shape expressions of the graph, resolves
call targets by walking `torch.*` attributes, puts names from the file into generated Python,
and ep.module() execs the stored guard code. So before torch sees the file:

* the archive's layout is checked as for checkpoints (bnstrip.io.torchzip, same rules);
* every pickle inside is checked as a checkpoint is (static global scan, storages backed by
  their records), and opaque/TorchScript objects are refused;
* the graph JSON may only call `torch.ops.*` operators (and a few `_operator`/`math` functions),
  its names must be identifiers or dotted paths, its shape expressions plain arithmetic;
* every raw weight must fit in its record (sizes, strides and offset against the record's bytes).

Then torch.export.load runs with torch.load forced to weights_only=True, and the stored guard
code is dropped (bnstrip exports its own programs again, with guards torch writes).
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from bnstrip.errors import InputError, first_line, printable
from bnstrip.io.sniff import ZIP_MAGIC, open_regular_file
from bnstrip.io.torchzip import ZipLayout, read_record, validate_torch_zip

_FIX = "re-export it with torch.export.save from a source you trust"
_OPERATOR_TARGETS = {f"_operator.{n}" for n in (
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne", "lt", "le",
    "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift")} | {
    f"math.{n}" for n in ("ceil", "floor", "trunc", "sqrt", "exp", "log", "sin", "cos", "tan", "pow")}
_OP_TARGET = re.compile(r"torch\.ops\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
_DOTTED = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def _reserved_part(fqn: str) -> str | None:
    """A part of a tensor's dotted name that torch cannot rebuild as a module attribute (a dunder, or a name
    nn.Module itself has: training, forward, ...), else None (issue 17 item 10)."""
    return next((part for part in fqn.split(".") if part.startswith("__") or part in _module_attributes()), None)


@functools.lru_cache(maxsize=1)
def _module_attributes() -> frozenset[str]:
    """What every nn.Module has, class and instance attributes alike (`training` is set in __init__)."""
    from torch import nn

    return frozenset(dir(nn.Module()))
_EXPR_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"
                         r"|(?P<str>'[A-Za-z_][A-Za-z0-9_]*')|(?P<op>\*\*|//|==|!=|<=|>=|[-+*/%(),<>=&|~]))")
_EXPR_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Max", "Min", "Mod", "Abs", "floor", "ceiling", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "And", "Or", "Not", "Piecewise", "True", "False", "oo", "nan", "sqrt", "Pow", "Mul", "Add",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift",
    "RShift", "PowByNatural", "IntTrueDiv", "FloatTrueDiv", "ToFloat", "TruncToInt", "TruncToFloat", "RoundToInt",
    "RoundDecimal", "OpaqueUnaryFn_sqrt", "Identity", "IsNonOverlappingAndDenseIndicator", "BitwiseFn_bitwise_and",
    "BitwiseFn_bitwise_or", "FloatPow", "positive", "integer", "nonnegative", "negative", "real", "finite",
    "nonpositive", "zero", "even", "odd"}
_SYMBOL_NAME = re.compile(r"[A-Za-z]{1,6}\d+")
_NAME_KEYS = {"name", "as_name", "arg_name"}
_FQN_KEYS = {"parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "fqn"}
_MAX_JSON = 256 << 20
"""A graph JSON larger than this is refused before parsing (json would hold several times it in memory)."""


def _refuse(path: Path, what: str) -> InputError:
    return InputError(f"{printable(path)}: refused: {what} (nothing was run); {_FIX}")


def _check_expr(text: str, path: Path) -> None:
    """A shape expression that sympy.sympify can only read as arithmetic on symbols (sympify evaluates Python)."""
    position = 0
    while position < len(text):
        match = _EXPR_TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise _refuse(path, f"shape expression {printable(text[:60])!r} is not plain arithmetic")
        name = match.group("name")
        if name is not None and name not in _EXPR_NAMES and not _SYMBOL_NAME.fullmatch(name):
            raise _refuse(path, f"shape expression {printable(text[:60])!r} names {printable(name)}")
        position = match.end()


def _check_target(target: str, path: Path) -> None:
    if _OP_TARGET.fullmatch(target) or target in _OPERATOR_TARGETS:
        return
    raise _refuse(path, f"its graph calls {printable(target[:80])!r}, which is not a torch operator")


def check_graph_json(data: Any, path: Path) -> None:
    """Walk the serialized program: call targets, names, FQNs and shape expressions (see the module docstring)."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, key = stack.pop()
        if isinstance(value, dict):
            if isinstance(value.get("target"), str) and "inputs" in value:
                _check_target(value["target"], path)
            for child_key, child in value.items():
                if child_key != "metadata":  # stack traces and module paths: strings torch never runs
                    stack.append((child, str(child_key)))
        elif isinstance(value, list):
            stack.extend((item, key) for item in value)
        elif isinstance(value, str):
            if key == "expr_str":
                _check_expr(value, path)
            elif key in _NAME_KEYS and value and not value.isidentifier():
                raise _refuse(path, f"graph name {printable(value[:60])!r} is not an identifier (it would be code)")
            elif key in _FQN_KEYS and value and not _DOTTED.fullmatch(value):
                raise _refuse(path, f"tensor name {printable(value[:60])!r} is not a dotted name")
            elif key == "guards_code":
                pass  # dropped after loading, never run


def _read_json(f: BinaryIO, layout: ZipLayout, name: str, path: Path) -> Any:
    record = layout.records[name]
    if record.size > _MAX_JSON:
        raise _refuse(path, f"{printable(name)} is {record.size:,} bytes of JSON")
    try:
        return json.loads(read_record(f, record))
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{printable(path)}: {printable(name)} is not valid JSON ({first_line(exc, 120)}); {_FIX}") from None


def _nested_torch_save(f: BinaryIO, layout: ZipLayout, name: str, path: Path) -> None:
    """A torch.save pickle inside the archive gets every check a checkpoint gets."""
    from bnstrip.io.checkpoint import validate_pickled

    data = read_record(f, layout.records[name])
    inner = Path(f"{path}:{name}")
    if not data.startswith(ZIP_MAGIC):
        raise _refuse(path, f"{printable(name)} is not a torch.save archive")
    validate_pickled(io.BytesIO(data), "torch-zip", len(data), inner)


def _dims(values: list[Any]) -> list[int] | None:
    out = []
    for v in values:
        if not (isinstance(v, dict) and type(v.get("as_int")) is int):
            return None
        out.append(v["as_int"])
    return out


def _check_payloads(f: BinaryIO, layout: ZipLayout, folder: str, config: Any, path: Path) -> None:
    """Each weight/constant: a pickle gets the checkpoint checks; raw bytes must hold what its metadata describes."""
    import torch
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _refuse(path, f"{folder} config is malformed")
    for fqn, meta in entries.items():
        if not _DOTTED.fullmatch(str(fqn)) or not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise _refuse(path, f"{folder} entry {printable(str(fqn)[:60])!r} is malformed")
        if _reserved_part(fqn) is not None:
            raise _refuse(path, f"tensor name {printable(fqn[:60])!r} uses {_reserved_part(fqn)!r}, an attribute every "
                                "torch module has")
        record = f"{layout.prefix}/{folder}/{meta['path_name']}"
        if "/" in meta["path_name"] or record not in layout.records:
            raise InputError(f"{printable(path)}: {printable(fqn)} names record {printable(record)}, which the archive "
                             f"lacks (incomplete file); {_FIX}")
        if not meta["path_name"].startswith(("weight_", "tensor_")):
            raise _refuse(path, f"{printable(fqn)} is a pickled Python/TorchScript object ({printable(meta['path_name'])})")
        if meta.get("use_pickle"):
            _nested_torch_save(f, layout, record, path)
            continue
        tm = meta.get("tensor_meta") or {}
        sizes, strides = _dims(tm.get("sizes", [])), _dims(tm.get("strides", []))
        offset = _dims([tm.get("storage_offset")])
        dtype = _SERIALIZE_TO_TORCH_DTYPE.get(tm.get("dtype")) if isinstance(tm.get("dtype"), int) else None
        if sizes is None or strides is None or offset is None or len(sizes) != len(strides) or dtype is None \
                or any(s < 0 for s in sizes) or any(s < 0 for s in strides) or offset[0] < 0:
            raise _refuse(path, f"{printable(fqn)} has malformed tensor metadata")
        needed = 0 if 0 in sizes else (offset[0] + 1 + sum((n - 1) * s for n, s in zip(sizes, strides)))
        needed *= torch.empty((), dtype=dtype).element_size()
        have = layout.records[record].size
        if have and needed > have:
            raise InputError(f"{printable(path)}: tensor {printable(fqn)} needs {needed:,} bytes but its record "
                             f"{printable(record)} holds {have:,} (truncated or crafted); {_FIX}")


def validate_pt2(f: BinaryIO, size: int, path: Path) -> ZipLayout:
    """Every static check of the module docstring, on the open file; returns the archive layout."""
    f.seek(0)
    if f.read(4) != ZIP_MAGIC:
        raise InputError(f"{printable(path)}: not an exported program (.pt2 files are zip archives written by "
                         "torch.export.save); pass such a file")
    layout = validate_torch_zip(f, size, path, require_pickle=False)
    p = layout.prefix
    fmt = layout.records.get(f"{p}/archive_format")
    if fmt is None or read_record(f, fmt).strip() != b"pt2":
        raise InputError(f"{printable(path)}: a zip archive but not an exported program (no {p}/archive_format pt2; "
                         "a torch.save checkpoint or a pre-2.8 .pt2?); save the program with torch.export.save")
    names = list(layout.records)
    if any(n.startswith((f"{p}/data/aotinductor/", f"{p}/executorch/")) for n in names):
        raise _refuse(path, "it holds compiled native code (AOTInductor/ExecuTorch), which bnstrip will not load")
    models = [n for n in names if n.startswith(f"{p}/models/") and n.endswith(".json")]
    if f"{p}/models/model.json" not in models:
        raise InputError(f"{printable(path)}: the archive holds no program {p}/models/model.json; {_FIX}")
    for model in models:
        stem = model[len(f"{p}/models/"):-len(".json")]
        check_graph_json(_read_json(f, layout, model, path), path)
        for folder, config in (("data/weights", f"{p}/data/weights/{stem}_weights_config.json"),
                               ("data/constants", f"{p}/data/constants/{stem}_constants_config.json")):
            if config not in layout.records:
                raise InputError(f"{printable(path)}: the archive lacks {printable(config)} (legacy or incomplete "
                                 f"file); {_FIX}")
            _check_payloads(f, layout, folder, _read_json(f, layout, config, path), path)
        sample = f"{p}/data/sample_inputs/{stem}.pt"
        if sample in layout.records and layout.records[sample].size:
            _nested_torch_save(f, layout, sample, path)
    return layout


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """torch.load with weights_only=True whatever the caller asks (torch.export.load asks for False)."""
    import torch

    from bnstrip.io.checkpoint import UNSAFE_LOAD_ENV

    original = torch.load
    saved = os.environ.pop(UNSAFE_LOAD_ENV, None)

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
        if saved is not None:
            os.environ[UNSAFE_LOAD_ENV] = saved


class _LoggedErrors(logging.Handler):
    """Keeps the first exception torch.export logs while loading: its error then names that, not "the warnings above"."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.first: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.first is None and record.exc_info and record.exc_info[1] is not None:
            cause = record.exc_info[1]
            while cause.__cause__ is not None:  # the innermost reason ("failed to resolve X to an operator")
                cause = cause.__cause__
            self.first = cause

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        logger = logging.getLogger("torch.export")
        level, propagate, handlers = logger.level, logger.propagate, logger.handlers
        logger.setLevel(logging.WARNING)  # heard here only: no other handler, not propagated, nothing printed
        logger.propagate, logger.handlers = False, [self]
        try:
            yield
        finally:
            logger.setLevel(level)
            logger.propagate, logger.handlers = propagate, handlers


def load_program(path: str | os.PathLike[str]) -> Any:
    """The ExportedProgram in `path`, after validate_pt2; InputError (one line) for anything refused or broken."""
    import torch

    from bnstrip.trace.export_tracer import _quiet_torch_logs

    path = Path(path)
    with open_regular_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        validate_pt2(f, size, path)
        f.seek(0)
        data = f.read()  # torch reads the validated bytes, not the path (which could be swapped meanwhile)
    logged = _LoggedErrors()
    try:
        with _weights_only_loads(), _quiet_torch_logs(), logged.attached():
            program = torch.export.load(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - torch raises many types on a broken program
        reason = logged.first or exc  # torch logs the real reason and raises "check the warnings above", unshown
        text = first_line(reason, 200, "").replace("Please check the warnings above for possible errors.", "").strip()
        raise InputError(f"{printable(path)}: torch.export.load fails ({type(reason).__name__}: {text}); {_FIX}") from None
    program._guards_code = []  # code from the file; bnstrip never runs it
    return program


def is_pt2(path: str | os.PathLike[str]) -> bool:
    """True when `path` is a zip archive with an `archive_format` record of `pt2` (content, not suffix)."""
    import zipfile

    try:
        with open_regular_file(path) as f:
            if f.read(4) != ZIP_MAGIC:
                return False
            f.seek(0)
            with zipfile.ZipFile(f) as archive:
                fmt = next((i for i in archive.infolist()
                            if i.filename.count("/") == 1 and i.filename.endswith("/archive_format")), None)
                return fmt is not None and fmt.file_size <= 16 and archive.read(fmt).strip() == b"pt2"
    except (InputError, OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False
