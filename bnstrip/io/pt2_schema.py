"""The serialized program of a `.pt2` (models/model.json) parsed against the fields bnstrip supports, and re-emitted.

torch.export.load turns this JSON into Python: names become identifiers in generated source, `forward_arg_names`
become the parameters of the generated `forward`, targets are looked up as attributes of `torch`, shape strings
go to sympy. So nothing of the file's JSON is passed on. `reemit_program` walks the document by the schema of
torch/_export/serde/schema.py (only the unions and fields below; anything else is refused by name) and builds
a new document: every value name and node name is one bnstrip generates (`v0`, `v1`, ...), `forward_arg_names`
are generated (`arg_0`, ... plus keyword names that pass a strict identifier rule), module paths keep their
segments only when each is a plain identifier or index (others become `bnstrip_renamed_N`), call targets pass
bnstrip.io.pt2_ops, shape expressions are re-printed by bnstrip.io.pt2_expr, metadata keeps only the module
stack (re-printed), and the file's guard code is dropped. Bounds: `MAX_LIST` items per list, `MAX_NODES` nodes.
"""
from __future__ import annotations

import keyword
import math
import re
from collections.abc import Callable
from typing import Any

from bnstrip.io.pt2_expr import ExprError, SymbolTable, canonical_expr

MAX_LIST = 100_000
MAX_NODES = 1_000_000
MAX_INT = 2 ** 63
SCALAR_TYPES: dict[int, int] = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 12: 1, 13: 2}
"""torch/_export/serde/schema.py ScalarType -> element size, for the dtypes bnstrip folds (BYTE .. BFLOAT16)."""
STRIDED = 7
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}|\d{1,9}")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}(\.[A-Za-z_][A-Za-z0-9_]{0,99}){0,20}")
_STRING_ARG = re.compile(r"[ -~]{0,256}")
"""String arguments (padding="same", approximate="tanh", an assert's message): printable ASCII, no control
characters; torch passes them to the op as values (generated code holds their repr)."""
_VERIFIERS = {"ATEN", "TRAINING", ""}


class SchemaError(ValueError):
    """The program JSON has a field, kind or value bnstrip does not support; the message says where."""


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise SchemaError(what)


def _dict(value: Any, what: str, keys: set[str] | None = None) -> dict[str, Any]:
    _need(isinstance(value, dict), f"{what} is not an object")
    if keys is not None:
        extra = set(value) - keys
        _need(not extra, f"{what} has fields bnstrip does not support: {', '.join(sorted(map(str, extra)))[:120]}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    _need(isinstance(value, list) and len(value) <= MAX_LIST, f"{what} is not a list of at most {MAX_LIST:,} items")
    return value


def _int(value: Any, what: str) -> int:
    _need(type(value) is int and -MAX_INT < value < MAX_INT, f"{what} is not an integer below 2**63")
    return value


def _bool(value: Any, what: str) -> bool:
    _need(type(value) is bool, f"{what} is not true/false")
    return value


def _float(value: Any, what: str) -> float:
    _need(type(value) in (int, float) and not (isinstance(value, float) and math.isnan(value)), f"{what} is not a number")
    return float(value)


def _is_int_in(value: Any, allowed: Any) -> bool:
    """An int (not a bool, which JSON `true` would be) among `allowed`."""
    return type(value) is int and value in allowed


def _union(value: Any, what: str) -> tuple[str, Any]:
    _need(isinstance(value, dict) and len(value) == 1, f"{what} is not a one-field union")
    (kind, inner), = value.items()
    return str(kind), inner


_CODEGEN_GLOBALS = frozenset({"self", "torch", "fx_pytree", "pytree", "inf", "nan", "device", "builtins"})
"""Names the forward torch generates relies on: an argument may not shadow them."""


def plain_identifier(name: Any) -> bool:
    """A plain Python identifier that cannot be code: an op's keyword-argument name (`device=`), which shadows nothing."""
    return isinstance(name, str) and bool(_IDENT.fullmatch(name)) and not keyword.iskeyword(name) \
        and not name.startswith("__")


def safe_identifier(name: Any) -> bool:
    """A plain Python identifier that cannot be code and shadows nothing the generated forward uses."""
    return plain_identifier(name) and name not in _CODEGEN_GLOBALS


class Emitter:
    """One program's renaming state: value names, module path segments and shape symbols."""

    def __init__(self) -> None:
        import torch

        self.values: dict[str, str] = {}
        self.segments: dict[str, str] = {}
        self.symbols = SymbolTable()
        self.graph_inputs: set[str] = set()
        """Placeholders, and values that may be views of them (in-place ops may not write these)."""
        self.defined: set[str] = set()
        self.module_attrs = set(dir(torch.nn.Module()))  # instance: `training` is set in __init__

    # ----------------------------------------------------------------- names
    def declare(self, name: Any, what: str) -> str:
        _need(isinstance(name, str) and name not in self.values, f"{what} {str(name)[:60]!r} is not a new value name")
        self.values[name] = f"v{len(self.values)}"
        return self.values[name]

    def value(self, name: Any, what: str) -> str:
        _need(isinstance(name, str) and name in self.values, f"{what} names an undefined value {str(name)[:60]!r}")
        return self.values[name]

    def fqn(self, path: Any, what: str) -> str:
        """A module/tensor path with each unsafe segment (not an identifier or index, dunder, keyword, nn.Module
        attribute such as `training`) mapped to a generated one, the same way everywhere in the program."""
        _need(isinstance(path, str) and len(path) <= 1000, f"{what} is not a name")
        if path == "":
            return ""
        out = []
        for segment in path.split("."):
            safe = _SEGMENT.fullmatch(segment) and not keyword.iskeyword(segment) \
                and not segment.startswith("__") and segment not in self.module_attrs
            if not safe:
                segment = self.segments.setdefault(segment, f"bnstrip_renamed_{len(self.segments)}")
            out.append(segment)
        return ".".join(out)

    # ----------------------------------------------------------------- shapes
    def expr(self, text: Any, what: str) -> str:
        try:
            return canonical_expr(text, self.symbols)
        except ExprError as exc:
            raise SchemaError(f"{what}: shape expression {str(text)[:40]!r} refused ({exc})") from None

    def sym_int(self, value: Any, what: str) -> dict[str, Any]:
        kind, inner = _union(value, what)
        if kind == "as_int":
            return {"as_int": _int(inner, what)}
        _need(kind == "as_expr", f"{what}: SymInt kind {kind!r} is not supported")
        body = _dict(inner, what, {"expr_str", "hint"})
        hint = body.get("hint")
        if hint is not None:
            hint_kind, hint_value = _union(hint, f"{what} hint")
            _need(hint_kind == "as_int", f"{what}: a size hint must be an integer")
            hint = {"as_int": _int(hint_value, f"{what} hint")}
        return {"as_expr": {"expr_str": self.expr(body.get("expr_str"), what), "hint": hint}}

    def sym_bool(self, value: Any, what: str) -> dict[str, Any]:
        kind, inner = _union(value, what)
        _need(kind == "as_bool", f"{what}: symbolic booleans (guards on shapes) are not supported")
        return {"as_bool": _bool(inner, what)}

    def device(self, value: Any, what: str) -> dict[str, Any]:
        body = _dict(value, what, {"type", "index"})
        _need(body.get("type") == "cpu" and (body.get("index") is None or _is_int_in(body.get("index"), {0})),
              f"{what}: device {str(body.get('type'))[:20]!r} (bnstrip loads programs on the CPU; export on CPU)")
        return {"type": "cpu", "index": body.get("index")}

    def tensor_meta(self, value: Any, what: str, concrete: bool = False) -> dict[str, Any]:
        body = _dict(value, what, {"dtype", "sizes", "requires_grad", "device", "strides", "storage_offset", "layout"})
        _need(_is_int_in(body.get("dtype"), SCALAR_TYPES), f"{what}: dtype {str(body.get('dtype'))[:10]} is not supported")
        _need(_is_int_in(body.get("layout"), {STRIDED}), f"{what}: only strided (dense) tensors are supported")
        sizes = [self.sym_int(s, f"{what} size") for s in _list(body.get("sizes"), f"{what} sizes")]
        strides = [self.sym_int(s, f"{what} stride") for s in _list(body.get("strides"), f"{what} strides")]
        _need(len(sizes) == len(strides) <= 64, f"{what}: sizes and strides disagree")
        offset = self.sym_int(body.get("storage_offset"), f"{what} storage offset")
        if concrete:
            _need(all("as_int" in s for s in sizes + strides + [offset]), f"{what}: a stored tensor has symbolic sizes")
        return {"dtype": body["dtype"], "sizes": sizes, "requires_grad": _bool(body.get("requires_grad"), what),
                "device": self.device(body.get("device"), what), "strides": strides, "storage_offset": offset,
                "layout": STRIDED}

    # ----------------------------------------------------------------- arguments
    def tensor_arg(self, value: Any, what: str) -> dict[str, str]:
        body = _dict(value, what, {"name"})
        return {"name": self.value(body.get("name"), what)}

    def optional_tensor(self, value: Any, what: str) -> dict[str, Any]:
        kind, inner = _union(value, what)
        if kind == "as_none":
            return {"as_none": True}
        _need(kind == "as_tensor", f"{what}: optional tensor kind {kind!r}")
        return {"as_tensor": self.tensor_arg(inner, what)}

    def sym_arg(self, value: Any, what: str, literal: str, check: Callable[[Any, str], Any]) -> dict[str, Any]:
        kind, inner = _union(value, what)
        if kind == "as_name":
            return {"as_name": self.value(inner, what)}
        _need(kind == literal, f"{what}: kind {kind!r}")
        return {literal: check(inner, what)}

    def argument(self, value: Any, what: str) -> dict[str, Any]:
        kind, inner = _union(value, what)
        handler = _ARGUMENTS.get(kind)
        _need(handler is not None, f"{what}: argument kind {kind!r} (graphs, custom objects, operators) is not supported")
        assert handler is not None
        return {kind: handler(self, inner, f"{what} ({kind})")}


def _literal_true(value: Any, what: str) -> bool:
    _need(value is True, f"{what} is not true")
    return True


def _items(check: Callable[[Emitter, Any, str], Any]) -> Callable[[Emitter, Any, str], list[Any]]:
    return lambda e, v, w: [check(e, item, w) for item in _list(v, w)]


def _string(_: Emitter, value: Any, what: str) -> str:
    _need(isinstance(value, str) and bool(_STRING_ARG.fullmatch(value)), f"{what}: string argument is not printable ASCII of at most 256 characters")
    return value


def _literal(check: Callable[[Any, str], Any]) -> Callable[[Emitter, Any, str], Any]:
    return lambda _, v, w: check(v, w)


def _enum(allowed: set[int]) -> Callable[[Emitter, Any, str], int]:
    def check(_: Emitter, value: Any, what: str) -> int:
        _need(_is_int_in(value, allowed), f"{what}: value {str(value)[:10]} is not supported")
        return int(value)
    return check


_ARGUMENTS: dict[str, Callable[[Emitter, Any, str], Any]] = {
    "as_none": lambda _, v, w: _literal_true(v, w),
    "as_tensor": Emitter.tensor_arg,
    "as_tensors": _items(Emitter.tensor_arg),
    "as_int": _literal(_int), "as_ints": _items(_literal(_int)),
    "as_float": _literal(_float), "as_floats": _items(_literal(_float)),
    "as_bool": _literal(_bool), "as_bools": _items(_literal(_bool)),
    "as_string": _string, "as_strings": _items(_string),
    "as_sym_int": lambda e, v, w: e.sym_arg(v, w, "as_int", _int),
    "as_sym_ints": _items(lambda e, v, w: e.sym_arg(v, w, "as_int", _int)),
    "as_sym_bool": lambda e, v, w: e.sym_arg(v, w, "as_bool", _bool),
    "as_sym_bools": _items(lambda e, v, w: e.sym_arg(v, w, "as_bool", _bool)),
    "as_scalar_type": _enum(set(SCALAR_TYPES)), "as_memory_format": _enum({0, 1, 2, 3, 4}),
    "as_layout": _enum({STRIDED}), "as_device": Emitter.device,
    "as_optional_tensor": Emitter.optional_tensor, "as_optional_tensors": _items(Emitter.optional_tensor),
}
"""Argument union members bnstrip supports (torch/_export/serde/schema.py Argument); each re-emitted."""
