"""bnstrip.io.pt2_reemit, pt2_ops, pt2_expr: what the canonical re-emit accepts, renames and refuses (issue 17)."""
from __future__ import annotations

import contextlib
import copy
import json
import signal
from pathlib import Path

import hostile_pt2
import pytest
import sympy
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnstrip.errors import InputError
from bnstrip.io.pt2 import load_program
from bnstrip.io.pt2_expr import MAX_INT, ExprError, SymbolTable, canonical_expr


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return hostile_pt2.good_program(tmp_path_factory.mktemp("pt2") / "good.pt2")


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail (not hang) when the body runs past `seconds` (the old loader took minutes on some of these)."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("target, why", [
    ("torch.ops.aten.relu_.default", "in place into a graph input"),
    ("torch.ops.aten.copy_.default", "not a pure tensor op"),
    ("torch.ops.aten.bernoulli.default", "not a pure tensor op"),
    ("torch.ops.evil.op.default", "not a torch operator"),
    ("torch.ops.aten.add.out", "writes into a given tensor"),
])
def test_ops_outside_the_allowlist_are_refused(good, tmp_path, target, why):
    def edit(doc):
        doc["graph_module"]["graph"]["nodes"][0]["target"] = target

    evil = hostile_pt2.edit_program(good, tmp_path / "evil.pt2", edit)
    with pytest.raises(InputError, match=why):
        load_program(evil)

@pytest.mark.parametrize("expr", ["9**9**9", "10**10**10", "1e999999", "Symbol('s0') ** 99999999999",
                                  "s0*" * 2000 + "s0", "(" * 200 + "s0" + ")" * 200])
def test_huge_shape_expressions_are_refused_fast(good, tmp_path, expr):
    """Item 4: bnstrip's grammar has no powers or floats and bounds length and depth; sympy never sees these."""
    evil = hostile_pt2.shape_expression(good, tmp_path / "evil.pt2", expr)
    with _deadline(60), pytest.raises(InputError, match="shape expression"):
        load_program(evil)

def test_unsafe_tensor_names_are_mapped(good, tmp_path):
    """FQN segments that are not plain identifiers (dunder, nn.Module attributes) get generated names."""
    def rename(text: str) -> str:
        return text.replace('"0.weight"', '"training.weight"').replace('"0.bias"', '"training.bias"')

    def change(name, data):
        return rename(data.decode()).encode() if name.endswith(".json") else data

    path = hostile_pt2.rewrite(good, tmp_path / "names.pt2", lambda n, d: change(n, d))
    program = load_program(path)
    assert {"bnstrip_renamed_0.weight", "bnstrip_renamed_0.bias"} <= set(program.state_dict)

def test_the_schema_bnstrip_emits_is_torchs():
    """bnstrip re-emits torch's serialized-program schema by hand: every field, union member and dtype code it
    writes must still exist in torch/_export/serde/schema.py. Not a torch_behaviour test: when torch changes the
    schema this fails the suite by name (loading then fails closed: torch refuses bnstrip's archive)."""
    import dataclasses

    from torch._export.serde import schema

    from bnstrip.io.pt2_schema import _ARGUMENTS, SCALAR_TYPES, STRIDED

    argument_fields = {f.name for f in dataclasses.fields(schema.Argument)}
    assert set(_ARGUMENTS) <= argument_fields
    program_fields = {f.name for f in dataclasses.fields(schema.ExportedProgram)}
    assert {"graph_module", "opset_version", "range_constraints", "schema_version", "verifiers", "torch_version",
            "guards_code"} <= program_fields
    assert schema.Layout(STRIDED).name == "Strided"
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    for code, size in SCALAR_TYPES.items():
        assert _SERIALIZE_TO_TORCH_DTYPE[schema.ScalarType(code)].itemsize == size

def test_in_place_through_a_view_of_an_input_is_refused(good, tmp_path):
    """A view of a graph input is the input: relu_ on `x.view(...)` would write into the caller's tensor."""
    def edit(doc):
        graph = doc["graph_module"]["graph"]
        x = graph["nodes"][0]["inputs"][0]["arg"]["as_tensor"]["name"]
        graph["tensor_values"]["xv"] = graph["tensor_values"][x]
        graph["tensor_values"]["xr"] = graph["tensor_values"][x]
        graph["nodes"][:0] = [
            {"target": "torch.ops.aten.alias.default", "name": "xv", "metadata": {},
             "inputs": [{"name": "self", "arg": {"as_tensor": {"name": x}}, "kind": 1}],
             "outputs": [{"as_tensor": {"name": "xv"}}]},
            {"target": "torch.ops.aten.relu_.default", "name": "xr", "metadata": {},
             "inputs": [{"name": "self", "arg": {"as_tensor": {"name": "xv"}}, "kind": 1}],
             "outputs": [{"as_tensor": {"name": "xr"}}]}]

    with pytest.raises(InputError, match="relu_.default: it writes in place into a graph input"):
        load_program(hostile_pt2.edit_program(good, tmp_path / "evil.pt2", edit))


def _infix(tree) -> str:
    if isinstance(tree, (int, str)):
        return str(tree)
    op, a, b = tree
    return f"{op}({_infix(a)}, {_infix(b)})" if op in ("Max", "Min") else f"({_infix(a)} {op} {_infix(b)})"


def _sympy(tree, s0, s1):
    if isinstance(tree, int):
        return sympy.Integer(tree)
    if isinstance(tree, str):
        return {"s0": s0, "s1": s1}[tree]
    op, a, b = tree
    x, y = _sympy(a, s0, s1), _sympy(b, s0, s1)
    return {"+": lambda: x + y, "-": lambda: x - y, "*": lambda: x * y, "Max": lambda: sympy.Max(x, y),
            "Min": lambda: sympy.Min(x, y)}[op]()


_trees = st.recursive(st.integers(0, 10 ** 6) | st.sampled_from(["s0", "s1"]),
                      lambda inner: st.tuples(st.sampled_from(["+", "-", "*", "Max", "Min"]), inner, inner),
                      max_leaves=12)


@given(_trees)
@settings(max_examples=60, deadline=None)
def test_grammar_prints_what_sympy_would_build(tree):
    """The canonical print, read back by sympy, is the expression the infix text means (sympy built it directly)."""
    s0, s1 = sympy.Symbol("s0", integer=True, positive=True), sympy.Symbol("s1", integer=True, positive=True)
    printed = canonical_expr(_infix(tree), SymbolTable())
    assert sympy.simplify(sympy.sympify(printed) - _sympy(tree, s0, s1)) == 0


@pytest.mark.parametrize("text, why", [
    ("s0 ** 2", "powers"), ("2.5 * s0", "unexpected"), ("x0 + 1", "not an integer"),
    (str(MAX_INT), "beyond 2\\*\\*62"), ("Symbol('s0').__class__", "unexpected"), ("Lambda(s0, s0)", "not in"),
    ("s0 + " * 600 + "1", "terms"), ("Symbol('s0', commutative=False)", "not allowed"), ("", "not an integer")])
def test_grammar_refuses_with_the_reason(text, why):
    with pytest.raises(ExprError, match=why):
        canonical_expr(text, SymbolTable())


def test_a_value_made_twice_is_refused(good, tmp_path):
    def edit(doc):
        nodes = doc["graph_module"]["graph"]["nodes"]
        nodes[1]["outputs"] = nodes[0]["outputs"]

    with pytest.raises(InputError, match="made twice"):
        load_program(hostile_pt2.edit_program(good, tmp_path / "twice.pt2", edit))


class _Varied(nn.Module):
    """Keyword input, lifted constant, non-persistent buffer, chunk/cat, max-pool indices, view on a dynamic batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)
        self.register_buffer("scale", torch.ones(1), persistent=False)
        self.const = torch.tensor([2.0])

    def forward(self, x, *, bias):
        a, b = F.relu(self.bn(self.conv(x))).chunk(2, dim=1)
        y, idx = F.max_pool2d(torch.cat([b, a], 1), 2, return_indices=True)
        return self.fc(y.view(y.size(0), -1)) * self.scale * self.const + bias, idx.float().mean()


class _Attention(nn.Module):
    """LayerNorm, GELU, softmax, matmul; a derived dynamic dim (2*t) whose strides torch writes with Pow."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.q = nn.LayerNorm(16), nn.Linear(16, 16)

    def forward(self, x):
        h = F.gelu(self.ln(x))
        q = self.q(h)
        return (torch.softmax(q @ q.transpose(1, 2) / 4.0, -1) @ h)[:, : x.shape[1] // 2]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["varied", "attention"])
def test_reemitted_program_computes_what_torch_loads(case, tmp_path):
    """Ground truth: torch.export.load of the same (trusted) file; same outputs, same symbol ranges."""
    batch = torch.export.Dim("b", min=1, max=32)
    if case == "varied":
        model, args, kwargs = _Varied().eval(), (torch.randn(2, 3, 8, 8),), {"bias": torch.randn(10)}
        shapes = {"x": {0: batch}, "bias": None}
    else:
        model, args, kwargs = _Attention().eval(), (torch.randn(2, 6, 16),), {}
        shapes = ({0: batch, 1: 2 * torch.export.Dim("t", min=1, max=64)},)
    path = tmp_path / "p.pt2"
    torch.export.save(torch.export.export(model, args, kwargs, dynamic_shapes=shapes), path)
    trusted, ours = torch.export.load(path), load_program(path)
    for a, b in zip(pytree.tree_leaves(trusted.module()(*args, **kwargs)), pytree.tree_leaves(ours.module()(*args, **kwargs)), strict=True):
        assert torch.equal(a, b)
    symbols = {str(k): (int(v.lower), int(v.upper)) for k, v in trusted.range_constraints.items() if k.is_Symbol}
    assert {str(k): (int(v.lower), int(v.upper)) for k, v in ours.range_constraints.items()} == symbols


@pytest.mark.parametrize("text, ok", [("Pow(Symbol('s0', integer=True, positive=True), Integer(2))", True),
                                      ("Pow(s0, 8)", True), ("Pow(s0, 9)", False), ("Pow(s0, 0009)", False),
                                      ("Pow(Pow(s0, 2), 2)", False), ("Pow(s0, -1)", False)])
def test_small_powers_only(text, ok):
    if ok:
        assert canonical_expr(text, SymbolTable()).startswith("Pow(")
    else:
        with pytest.raises(ExprError):
            canonical_expr(text, SymbolTable())


@pytest.mark.parametrize("train, refused", [(False, False), (True, True)])
def test_dropout_is_allowed_only_as_the_eval_identity(good, tmp_path, train, refused):
    """torchvision's MobileNetV3/EfficientNet export `aten.dropout_(x, p, train=False)`; train=True is random."""
    def edit(doc):
        graph = doc["graph_module"]["graph"]
        last = graph["nodes"][-1]["outputs"][0]["as_tensor"]["name"]
        graph["tensor_values"]["dropped"] = graph["tensor_values"][last]
        graph["nodes"].append({"target": "torch.ops.aten.dropout_.default", "name": "dropped", "metadata": {},
                               "inputs": [{"name": "self", "arg": {"as_tensor": {"name": last}}, "kind": 1},
                                          {"name": "p", "arg": {"as_float": 0.2}, "kind": 1},
                                          {"name": "train", "arg": {"as_bool": train}, "kind": 1}],
                               "outputs": [{"as_tensor": {"name": "dropped"}}]})
        graph["outputs"] = [{"as_tensor": {"name": "dropped"}}]
        doc["graph_module"]["signature"]["output_specs"][0]["user_output"]["arg"] = {"as_tensor": {"name": "dropped"}}

    path = hostile_pt2.edit_program(good, tmp_path / "dropout.pt2", edit)
    if refused:
        with pytest.raises(InputError, match="dropout_.default: it is random"):
            load_program(path)
    else:
        program = load_program(path)
        x = program.example_inputs[0][0]
        assert torch.equal(program.module()(x), torch.export.load(good).module()(x))


def test_a_program_torch_cannot_rebuild_is_one_line_with_the_cause(good, tmp_path):
    """torch.export.load logs its reason and raises "check the warnings above"; bnstrip says the reason, once."""
    from click.testing import CliRunner

    from bnstrip.cli import main

    def edit(doc):
        doc["graph_module"]["graph"]["nodes"][0]["inputs"][0]["name"] = "not_the_schema_name"

    path = hostile_pt2.edit_program(good, tmp_path / "mismatch.pt2", edit)
    result = CliRunner().invoke(main, ["fuse", str(path), str(tmp_path / "out.pt2")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "mismatch.pt2" in lines[0] and "cause KeyError" in lines[0], result.stderr


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value[:3]):
            yield from _paths(child, (*prefix, index))


_JUNK = [None, True, 0, -1, 2 ** 70, 1.5, float("inf"), "", "s0", "__import__('os')", [], [1], [[]], {}, {"a": 1},
         {"as_int": 1}, {"name": 1}, {"as_expr": {"expr_str": "s0", "hint": None}}]


@given(st.data())
@settings(max_examples=80, deadline=None)
def test_any_mutation_is_reemitted_or_refused_by_name(good, data):
    """Whatever a file puts anywhere in the program JSON, the re-emit returns a document or raises SchemaError
    (a one-line refusal), never another exception."""
    from bnstrip.io.pt2_reemit import reemit_program
    from bnstrip.io.pt2_schema import SchemaError

    doc = hostile_pt2.program_doc(good)
    paths = [p for p in _paths(doc) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        target = doc
        try:
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = copy.deepcopy(data.draw(st.sampled_from(_JUNK)))
        except (KeyError, IndexError, TypeError):
            continue
    try:
        reemit_program(doc)
    except SchemaError:
        pass


@pytest.mark.parametrize("key", ["x=__import__('os').system('true')", "torch", "__class__", "lambda", "a b"])
def test_keyword_input_names_must_be_plain_identifiers(good, tmp_path, key):
    """Keyword inputs keep their names (they are the program's calling convention), so they must be harmless."""
    def edit(doc):
        signature = doc["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(signature["in_spec"])
        spec[1]["children_spec"][1] = {"type": "builtins.dict", "context": json.dumps([key]),
                                       "children_spec": [{"type": None, "context": None, "children_spec": []}]}
        signature["in_spec"] = json.dumps(spec)

    with pytest.raises(InputError, match="dict keys must be plain identifiers"):
        load_program(hostile_pt2.edit_program(good, tmp_path / "kw.pt2", edit))
