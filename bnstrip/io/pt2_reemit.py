"""The program document of a `.pt2` re-emitted: graph, signature, calling convention, ranges (see pt2_schema).

`reemit_program(doc)` returns the new document and what the weight configs need (`Emitter.fqn` keeps the
renaming of tensor paths consistent). Fields it does not know are refused, not copied; fields torch writes
that carry no meaning for the program (stack traces, the file's guard code, submodule call entries) are dropped.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from bnstrip.errors import printable
from bnstrip.io.pt2_expr import SYMBOL
from bnstrip.io.pt2_ops import OpRefused, check_target, known_target, may_alias
from bnstrip.io.pt2_schema import (
    MAX_NODES,
    Emitter,
    SchemaError,
    _bool,
    _dict,
    _int,
    _is_int_in,
    _list,
    _need,
    _union,
    plain_identifier,
    safe_identifier,
)

MAX_SPEC_NODES = 10_000
_TYPE_STR = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}(\.[A-Za-z_][A-Za-z0-9_]{0,99}){0,20}")
_CONTAINERS = {"builtins.tuple", "builtins.list", "builtins.dict"}
_VERIFIERS = {"ATEN", "TRAINING", ""}


def _treespec(text: Any, what: str) -> tuple[str, Any]:
    """A pytree spec string (JSON) rebuilt from tuples, lists, dicts with identifier-like keys, and leaves."""
    _need(isinstance(text, str) and len(text) <= 1 << 20, f"{what} is not a spec string")
    try:
        version, root = json.loads(text)
    except (ValueError, TypeError, RecursionError):
        raise SchemaError(f"{what} is not a pytree spec") from None
    _need(version == 1, f"{what}: spec version {str(version)[:10]}")
    count = [0]

    def node(value: Any, depth: int) -> dict[str, Any]:
        count[0] += 1
        _need(depth <= 32 and count[0] <= MAX_SPEC_NODES, f"{what} is nested too deep or too large")
        body = _dict(value, what, {"type", "context", "children_spec"})
        children = _list(body.get("children_spec"), what)
        kind = body.get("type")
        if kind is None:
            _need(body.get("context") is None and not children, f"{what}: a leaf with children")
            return {"type": None, "context": None, "children_spec": []}
        _need(isinstance(kind, str) and kind in _CONTAINERS, f"{what}: container type {str(kind)[:60]!r} is not supported")
        context = "null"
        if kind == "builtins.dict":
            keys = _json_list(body.get("context"), what)
            _need(isinstance(keys, list) and len(keys) == len(children) and all(safe_identifier(k) for k in keys),
                  f"{what}: dict keys must be plain identifiers")
            context = json.dumps(keys)
        else:
            _need(body.get("context") in ("null", None), f"{what}: a {kind} spec with context")
        return {"type": kind, "context": context, "children_spec": [node(c, depth + 1) for c in children]}

    rebuilt = node(root, 0)
    return json.dumps([1, rebuilt]), rebuilt


def _json_list(text: Any, what: str) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) and len(text) <= 1 << 16 else None
    except (ValueError, RecursionError):
        raise SchemaError(f"{what}: dict keys are not JSON") from None


def _arg_names(in_spec: dict[str, Any]) -> list[str]:
    """forward's parameter names: generated for positional inputs, the (checked) keys for keyword inputs."""
    children = in_spec["children_spec"]
    if in_spec["type"] == "builtins.tuple" and len(children) == 2 and children[0]["type"] == "builtins.tuple" \
            and children[1]["type"] == "builtins.dict":
        keys = json.loads(children[1]["context"])
        _need(not any(re.fullmatch(r"arg_\d+", k) for k in keys), "keyword input names collide with arg_N")
        return [f"arg_{i}" for i in range(len(children[0]["children_spec"]))] + keys
    return [f"arg_{i}" for i in range(len(children))]


def _nn_module_stack(text: Any, e: Emitter) -> str | None:
    """`key,path,type;...` re-printed with bnstrip's keys, mapped paths and plain dotted type names."""
    if not isinstance(text, str) or not text:
        return None
    items = []
    for item in text.split(";")[:256]:
        parts = item.split(",")
        _need(len(parts) == 3, "a module stack entry is not key,path,type")
        path = e.fqn(parts[1], "module stack path")
        kind = parts[2] if _TYPE_STR.fullmatch(parts[2]) else "torch.nn.Module"
        items.append(f"L__self__{path},{path},{kind}")
    return ";".join(items)


def _outputs(e: Emitter, outputs: Any, what: str) -> list[dict[str, Any]]:
    """A node's outputs: the values it makes, each described in the value tables and made only once."""
    out = [e.argument(value, what) for value in _list(outputs, what)]
    _define(e, out, what)
    return out


def _define(e: Emitter, args: list[dict[str, Any]], what: str) -> None:
    """Mark the values these (re-emitted) arguments name as made; a value made twice is refused."""
    for arg in args:
        (inner,) = arg.values()
        for item in inner if isinstance(inner, list) else [inner]:
            name = item.get("name") or item.get("as_name") if isinstance(item, dict) else None
            if isinstance(item, dict) and "as_tensor" in item:
                name = item["as_tensor"]["name"]
            if isinstance(name, str):
                _need(name not in e.defined, f"{what}: value {name} is made twice")
                e.defined.add(name)


def _tensor_names(outputs: list[dict[str, Any]]) -> list[str]:
    names = []
    for out in outputs:
        names += [out["as_tensor"]["name"]] if "as_tensor" in out else [t["name"] for t in out.get("as_tensors", [])]
    return names


def _target(target: Any, what: str, check: Callable[[Any], Any]) -> str:
    """The node's target after `check` (a pt2_ops rule); SchemaError naming the op otherwise."""
    try:
        check(target)
    except OpRefused as exc:
        shown = target if isinstance(target, str) else type(target).__name__
        raise SchemaError(f"{what} calls {printable(str(shown)[:80]).removeprefix('torch.ops.')}: {exc}") from None
    return str(target)


def _node(e: Emitter, value: Any, index: int) -> dict[str, Any]:
    what = f"node {index}"
    body = _dict(value, what, {"target", "inputs", "outputs", "metadata", "is_hop_single_tensor_return", "name"})
    _need(body.get("is_hop_single_tensor_return") is None, f"{what}: higher-order ops are not supported")
    _target(body.get("target"), what, known_target)
    inputs, flags, self_arg = [], {}, None
    for position, named in enumerate(_list(body.get("inputs"), f"{what} inputs")):
        named = _dict(named, f"{what} input", {"name", "arg", "kind"})
        _need(plain_identifier(named.get("name")),  # an op's keyword name (`device=`), never a variable
              f"{what}: argument name {str(named.get('name'))[:40]!r}")
        kind = named.get("kind")
        _need(kind is None or _is_int_in(kind, {1, 2}), f"{what}: argument kind {str(kind)[:10]}")
        arg = e.argument(named.get("arg"), f"{what} argument {named['name']}")
        if position == 0:
            self_arg = next(iter(_tensor_names([arg])), None)
        if "as_bool" in arg:
            flags[named["name"]] = arg["as_bool"]
        inputs.append({"name": named["name"], "arg": arg, "kind": kind})
    target = _target(body.get("target"), what, lambda t: check_target(t, self_arg, e.graph_inputs, flags))
    outputs = _outputs(e, body.get("outputs"), f"{what} outputs")
    if self_arg in e.graph_inputs and may_alias(target):  # a view of an input is the input, for in-place rules
        e.graph_inputs.update(_tensor_names(outputs))
    metadata = _dict(body.get("metadata") or {}, f"{what} metadata")
    stack = _nn_module_stack(metadata.get("nn_module_stack"), e)
    first = outputs[0] if len(outputs) == 1 else {}
    name = (first.get("as_tensor") or {}).get("name") or (first.get("as_sym_int") or {}).get("as_name") \
        or f"node_{index}"
    return {"target": target, "inputs": inputs, "outputs": outputs,
            "metadata": {"nn_module_stack": stack} if stack else {}, "is_hop_single_tensor_return": None,
            "name": name}


def _graph(e: Emitter, value: Any) -> dict[str, Any]:
    body = _dict(value, "graph", {"inputs", "outputs", "nodes", "tensor_values", "sym_int_values", "sym_bool_values",
                                  "is_single_tensor_return", "custom_obj_values", "sym_float_values"})
    _need(not body.get("custom_obj_values") and not body.get("sym_float_values"),
          "graph: custom objects and symbolic floats are not supported")
    tensors = _dict(body.get("tensor_values"), "tensor values")
    sym_ints = _dict(body.get("sym_int_values") or {}, "symbolic ints")
    sym_bools = _dict(body.get("sym_bool_values") or {}, "symbolic bools")
    _need(len(tensors) + len(sym_ints) + len(sym_bools) <= MAX_NODES, "graph has too many values")
    new_tensors = {e.declare(k, "tensor value"): e.tensor_meta(v, f"tensor value {len(e.values)}")
                   for k, v in tensors.items()}
    new_ints = {e.declare(k, "symbolic int"): e.sym_int(v, "symbolic int") for k, v in sym_ints.items()}
    new_bools = {e.declare(k, "symbolic bool"): e.sym_bool(v, "symbolic bool") for k, v in sym_bools.items()}
    inputs = [e.argument(v, "graph input") for v in _list(body.get("inputs"), "graph inputs")]
    _define(e, inputs, "graph inputs")
    e.graph_inputs.update(e.defined)
    nodes = _list(body.get("nodes"), "graph nodes")
    _need(len(nodes) <= MAX_NODES, "graph has too many nodes")
    return {"inputs": inputs, "outputs": [e.argument(v, "graph output") for v in _list(body.get("outputs"), "outputs")],
            "nodes": [_node(e, n, i) for i, n in enumerate(nodes)], "tensor_values": new_tensors,
            "sym_int_values": new_ints, "sym_bool_values": new_bools,
            "is_single_tensor_return": _bool(body.get("is_single_tensor_return", False), "is_single_tensor_return"),
            "custom_obj_values": {}, "sym_float_values": {}}


def _input_spec(e: Emitter, value: Any) -> dict[str, Any]:
    kind, inner = _union(value, "input spec")
    if kind == "user_input":
        return {kind: {"arg": e.argument(_dict(inner, "user input", {"arg"}).get("arg"), "user input")}}
    if kind == "constant_input":
        body = _dict(inner, "constant input", {"name", "value"})
        ckind, cvalue = _union(body.get("value"), "constant input value")
        _need(ckind in ("as_none", "as_int", "as_float", "as_bool"), f"constant input of kind {ckind!r}")
        return {kind: {"name": e.value(body.get("name"), "constant input"),
                       "value": e.argument({ckind: cvalue}, "constant input")}}
    fields = {"parameter": "parameter_name", "buffer": "buffer_name", "tensor_constant": "tensor_constant_name"}
    _need(kind in fields, f"input spec {kind!r} (custom objects, tokens) is not supported")
    body = _dict(inner, kind, {"arg", fields[kind], "persistent"})
    out: dict[str, Any] = {"arg": e.tensor_arg(body.get("arg"), kind),
                           fields[kind]: e.fqn(body.get(fields[kind]), f"{kind} name")}
    if kind == "buffer":
        out["persistent"] = _bool(body.get("persistent"), "buffer persistent")
    return {kind: out}


def _output_spec(e: Emitter, value: Any) -> dict[str, Any]:
    kind, inner = _union(value, "output spec")
    _need(kind == "user_output", f"output spec {kind!r}: the program writes into its inputs or state, or is a "
                                 "training step (bnstrip folds inference programs)")
    return {kind: {"arg": e.argument(_dict(inner, "user output", {"arg"}).get("arg"), "user output")}}


def _call_graph(e: Emitter, value: Any) -> list[dict[str, Any]]:
    """Only the root entry: the program's calling convention, with generated parameter names."""
    entries = _list(value, "module call graph")
    _need(bool(entries), "module call graph is empty")
    root = _dict(entries[0], "module call graph root", {"fqn", "signature"})
    _need(root.get("fqn") == "", "the module call graph does not start at the root module")
    signature = _dict(root.get("signature"), "root signature",
                      {"inputs", "outputs", "in_spec", "out_spec", "forward_arg_names"})
    in_spec, in_tree = _treespec(signature.get("in_spec"), "in_spec")
    out_spec, _ = _treespec(signature.get("out_spec"), "out_spec")
    return [{"fqn": "", "signature": {
        "inputs": [e.argument(v, "root input") for v in _list(signature.get("inputs"), "root inputs")],
        "outputs": [e.argument(v, "root output") for v in _list(signature.get("outputs"), "root outputs")],
        "in_spec": in_spec, "out_spec": out_spec, "forward_arg_names": _arg_names(in_tree)}}]


def _ranges(value: Any) -> dict[str, dict[str, int | None]]:
    """Each size symbol's range. Ranges torch also writes for derived sizes (`2*s0`) are dropped: they follow
    from the symbols' own, and their keys would be expressions handed on as text."""
    out = {}
    for name, bounds in _dict(value or {}, "range constraints").items():
        if not SYMBOL.fullmatch(name):
            continue
        body = _dict(bounds, "range constraint", {"min_val", "max_val"})
        low, high = (None if body.get(k) is None else _int(body.get(k), "range bound") for k in ("min_val", "max_val"))
        out[name] = {"min_val": low, "max_val": high}
    return out


def reemit_program(doc: Any) -> tuple[dict[str, Any], Emitter]:
    """The canonical program document rebuilt from `doc` (see module docstring); SchemaError names what is refused."""
    body = _dict(doc, "program", {"graph_module", "opset_version", "range_constraints", "schema_version",
                                  "verifiers", "torch_version", "guards_code"})
    module = _dict(body.get("graph_module"), "graph module",
                   {"graph", "signature", "module_call_graph", "metadata", "treespec_namedtuple_fields"})
    _need(not module.get("treespec_namedtuple_fields"), "named tuples in the calling convention are not supported")
    e = Emitter()
    graph = _graph(e, module.get("graph"))
    signature = _dict(module.get("signature"), "signature", {"input_specs", "output_specs"})
    version = _dict(body.get("schema_version"), "schema version", {"major", "minor"})
    verifiers = _list(body.get("verifiers") or [], "verifiers")
    _need(all(isinstance(v, str) and v in _VERIFIERS for v in verifiers), "unknown verifier dialect")
    opset = _dict(body.get("opset_version") or {}, "opset version")
    new = {
        "graph_module": {
            "graph": graph,
            "signature": {"input_specs": [_input_spec(e, v) for v in _list(signature.get("input_specs"), "inputs")],
                          "output_specs": [_output_spec(e, v) for v in _list(signature.get("output_specs"), "outputs")]},
            "module_call_graph": _call_graph(e, module.get("module_call_graph")),
            "metadata": {}, "treespec_namedtuple_fields": {}},
        "opset_version": {"aten": _int(opset.get("aten", 10), "aten opset")},
        "range_constraints": _ranges(body.get("range_constraints")),
        "schema_version": {"major": _int(version.get("major"), "schema major"),
                           "minor": _int(version.get("minor"), "schema minor")},
        "verifiers": list(verifiers), "torch_version": _torch_version(), "guards_code": [],
    }
    return new, e


def _torch_version() -> str:
    import torch

    return str(torch.__version__)
