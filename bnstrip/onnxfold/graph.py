"""One ONNX graph indexed for folding: who produces and who reads each value, initializers, ranks, float64 values.

A value read inside a subgraph (If/Loop/Scan body) by its outer name counts as read by the
node that owns the subgraph, so a value a subgraph needs is never renamed or folded away.
`Workspace` holds the float64 values of every initializer a fold changed, so several folds
into one layer round once, at the end (`finish`).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

STANDARD_DOMAINS = ("", "ai.onnx")
MAX_CONSTANT_NODES = 64
"""Nodes a weight may be computed by from constants (Transpose, weight standardisation) and still fold."""


def subgraphs(node: Any) -> Iterator[Any]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def names_read(graph: Any) -> Iterator[str]:
    """Every value name a graph and its subgraphs read (conservatively: locals of a subgraph included)."""
    for node in graph.node:
        yield from (name for name in node.input if name)
        for sub in subgraphs(node):
            yield from names_read(sub)
    for out in graph.output:
        yield out.name


@dataclass
class Scope:
    """One graph (the main one or a subgraph body) with its indexes; `rebuild` after every edit."""

    graph: Any
    where: str
    """'' for the main graph, else the owning node and attribute, for messages."""
    shapes: dict[str, list[int | None] | None]
    producers: dict[str, Any] = field(default_factory=dict)
    readers: dict[str, list[tuple[Any, int]]] = field(default_factory=dict)
    inits: dict[str, Any] = field(default_factory=dict)
    graph_inputs: set[str] = field(default_factory=set)
    graph_outputs: set[str] = field(default_factory=set)
    opsets: list[Any] = field(default_factory=list)
    nodes: list[Any] = field(default_factory=list)
    """The graph's nodes as edited (removed ones dropped, inserted ones in place); `commit` writes them back."""

    def __post_init__(self) -> None:
        self.nodes = list(self.graph.node)

    def remove(self, node: Any) -> None:
        self.nodes = [n for n in self.nodes if n is not node]

    def insert_after(self, node: Any, new: Any) -> None:
        index = next(i for i, n in enumerate(self.nodes) if n is node)
        self.nodes.insert(index + 1, new)

    def commit(self) -> None:
        """The edited node list into the graph proto (subgraphs first: see fold.apply_folds)."""
        import onnx

        copies = []
        for node in self.nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copies.append(copy)
        del self.graph.node[:]
        self.graph.node.extend(copies)

    def rebuild(self) -> None:
        self.producers, self.readers = {}, {}
        self.inits = {t.name: t for t in self.graph.initializer}
        self.graph_inputs = {v.name for v in self.graph.input}
        self.graph_outputs = {v.name for v in self.graph.output}
        for node in self.nodes:
            for name in node.output:
                if name:
                    self.producers[name] = node
            for index, name in enumerate(node.input):
                if name:
                    self.readers.setdefault(name, []).append((node, index))
            for sub in subgraphs(node):
                for name in set(names_read(sub)):
                    self.readers.setdefault(name, []).append((node, -1))

    def uses(self, name: str) -> int:
        """How many reads `name` has, a graph output counting as one."""
        return len(self.readers.get(name, [])) + (name in self.graph_outputs)

    def only_reader(self, name: str) -> Any | None:
        """The node that is the single reader of `name` (by a plain input), else None."""
        readers = self.readers.get(name, [])
        if len(readers) != 1 or name in self.graph_outputs or readers[0][1] < 0:
            return None
        return readers[0][0]

    def constant(self, name: str) -> Any | None:
        """The tensor called `name` if it is a constant of this graph: an initializer (not overridable as a graph
        input) or a Constant node's `value`."""
        if name in self.graph_inputs:
            return None
        if name in self.inits:
            return self.inits[name]
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
            for entry in node.attribute:
                if entry.name == "value" and entry.HasField("t"):
                    return entry.t
        return None

    def computed_from_constants(self, name: str) -> list[Any] | None:
        """The nodes (in graph order) computing `name` from constants only (a Transpose of a weight, weight
        standardisation), or None if it depends on a graph input, a random op or more than MAX_CONSTANT_NODES."""
        needed, stack = set(), [name]
        while stack:
            value = stack.pop()
            if value in self.inits and value not in self.graph_inputs:
                continue
            node = self.producers.get(value)
            if value in self.graph_inputs or node is None or node.op_type.startswith("Random") \
                    or node.domain not in STANDARD_DOMAINS or any(True for _ in subgraphs(node)):
                return None
            if id(node) not in needed:
                needed.add(id(node))
                if len(needed) > MAX_CONSTANT_NODES:
                    return None
                stack.extend(n for n in node.input if n)
        return [node for node in self.nodes if id(node) in needed]

    def evaluate(self, name: str) -> Any:
        """The value of `name` (computed from constants only) by onnx's reference evaluator, in its own dtype."""
        import onnx
        from onnx.reference import ReferenceEvaluator

        nodes = self.computed_from_constants(name)
        if nodes is None:
            raise ValueError(f"'{name}' is not computed from constants only")
        if not nodes:
            return onnx.numpy_helper.to_array(self.inits[name])
        read = {n for node in nodes for n in node.input}
        graph = onnx.helper.make_graph(nodes, "constant", [], [onnx.helper.make_empty_tensor_value_info(name)],
                                       initializer=[t for t in self.graph.initializer if t.name in read])
        outputs = ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=self.opsets)).run(None, {})
        return next(iter(outputs))

    def drop_dead(self, candidates: set[int]) -> None:
        """Remove candidate nodes none of whose outputs is read any more (repeatedly: a chain dies together)."""
        changed = True
        while changed:
            changed = False
            for node in list(self.nodes):
                if id(node) in candidates and not any(self.uses(out) for out in node.output if out):
                    self.remove(node)
                    self.rebuild()
                    changed = True

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)


def attr(node: Any, name: str, default: Any = None) -> Any:
    """An attribute's value (onnx.helper.get_attribute_value), or `default`."""
    import onnx

    for entry in node.attribute:
        if entry.name == name:
            return onnx.helper.get_attribute_value(entry)
    return default


def inferred_shapes(model: Any) -> dict[str, list[int | None] | None]:
    """name -> dims (None for a symbolic dim) from onnx's shape inference (no data is evaluated)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - without shapes the rank-dependent patterns are refused, the others still fold
        inferred = model
    shapes: dict[str, list[int | None] | None] = {}

    def record(values: Any) -> None:
        for value in values:
            kind = value.type.WhichOneof("value")
            if kind != "tensor_type" or not value.type.tensor_type.HasField("shape"):
                shapes.setdefault(value.name, None)
                continue
            dims = value.type.tensor_type.shape.dim
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]

    from bnstrip.onnxfold.load import iter_graphs

    for graph in iter_graphs(inferred.graph):
        record(graph.input)
        record(graph.output)
        record(graph.value_info)
        for tensor in graph.initializer:
            shapes[tensor.name] = list(tensor.dims)
    return shapes


def scopes(model: Any, shapes: dict[str, list[int | None] | None]) -> list[Scope]:
    """A Scope for the main graph and for every subgraph body."""
    found: list[Scope] = []

    def walk(graph: Any, where: str) -> None:
        scope = Scope(graph, where, shapes, opsets=list(model.opset_import))
        scope.rebuild()
        found.append(scope)
        for node in graph.node:
            for entry in node.attribute:
                bodies = [entry.g] if entry.HasField("g") else list(entry.graphs)
                for body in bodies:
                    walk(body, f"{where}{node.name or node.op_type}.{entry.name}/")

    walk(model.graph, "")
    return found


class Workspace:
    """float64 values of the initializers folds change; each is rounded to its own dtype once, in `finish`."""

    def __init__(self, allow_overflow: bool = False) -> None:
        self.values: dict[tuple[str, str], tuple[Scope, Any, Any]] = {}
        """(scope, initializer name) -> (scope, float64 torch tensor, torch dtype to round to)."""
        self.allow_overflow = allow_overflow
        self.counter = 0
        self.opsets: list[Any] = []
        """The model's opset imports (to evaluate weights computed from constants)."""
        self.dead: set[int] = set()
        """Nodes that may have lost their last reader (Constant statistics, weight computations)."""

    def get(self, scope: Scope, name: str) -> Any:
        """The initializer's current value in float64 (torch)."""
        import torch

        held = self.values.get((scope.where, name))
        if held is not None:
            return held[1]
        return torch.from_numpy(_to_array(scope.constant(name)).astype("float64", copy=True))

    def set(self, scope: Scope, name: str, value64: Any, dtype: Any = None) -> None:
        held = self.values.get((scope.where, name))
        dtype = held[2] if held is not None else (dtype or torch_dtype(scope.inits[name]))
        self.values[(scope.where, name)] = (scope, value64, dtype)

    def finish(self) -> None:
        """Round every changed value once, with foldmath's overflow/finiteness checks, into its TensorProto."""
        import onnx

        from bnstrip.core.foldmath import cast_folded

        for (_, name), (scope, value64, dtype) in self.values.items():
            rounded = cast_folded(value64, dtype, f"{scope.where}{name}", "initializer", self.allow_overflow)
            for tensor in scope.graph.initializer:
                if tensor.name == name:
                    tensor.CopyFrom(onnx.numpy_helper.from_array(rounded.numpy(), name))

    def fresh_name(self, scope: Scope, stem: str) -> str:
        """A value name not used anywhere in the graph."""
        taken = set(scope.producers) | set(scope.readers) | set(scope.inits) | scope.graph_inputs
        while True:
            self.counter += 1
            name = f"{stem}_bnstrip{self.counter}"
            if name not in taken:
                return name


FLOAT_TYPES = {"float32", "float64", "float16"}


def _to_array(tensor: Any) -> Any:
    import onnx

    return onnx.numpy_helper.to_array(tensor)


def torch_dtype(tensor: Any) -> Any:
    """The torch dtype a float initializer rounds back to; ValueError for others (bfloat16, integers)."""
    import onnx
    import torch

    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    if np_dtype.name not in FLOAT_TYPES:
        raise ValueError(f"{tensor.name} is {np_dtype.name}, not float16/32/64")
    return getattr(torch, np_dtype.name)


def is_float_tensor(tensor: Any) -> bool:
    try:
        torch_dtype(tensor)
    except (ValueError, KeyError):
        return False
    return True
