"""Find sums of parallel linear branches in an fx graph: the matching half of branch merging (see reparam.py).

A sum is a tree of binary add/sub nodes (`a + b + c`, `out += f(x)`, `torch.add`, `x.sub(y)`) whose
inner nodes have no other user. Each operand (a "term") is walked back through linear steps, each
of which must have no other user: a plain Conv (not transposed), an eval BatchNorm, a scalar
multiply/divide/negation, or an nn.Identity. Where the walk stops is the term's base; terms with the
same base are a group, and a group with a conv in it is a candidate for one merged conv. Whether
its branches are compatible (stride, dilation, groups, padding alignment) is decided in reparam.py.
A term that reaches a group's base only through another op (a nonlinearity, or a linear op such as
a slice that is not one of those steps), or through a step whose output is also read elsewhere, is
reported with the true one of those reasons.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from bnstrip._torch import ConvNd as _ConvNd
from bnstrip._torch import ConvTransposeNd as _ConvTransposeNd
from bnstrip.core.foldmath import BNStats
from bnstrip.trace.classify import bn_refusal, layer_refusal
from bnstrip.trace.opgraph import functional_bn, is_functional_bn
from bnstrip.trace.reads import metadata_read

_ATEN = torch.ops.aten
_ADDS = {operator.add, torch.add, _ATEN.add.Tensor, _ATEN.add_.Tensor}
_SUBS = {operator.sub, torch.sub, _ATEN.sub.Tensor, _ATEN.sub_.Tensor}
_MULS = {operator.mul, torch.mul, _ATEN.mul.Tensor, _ATEN.mul.Scalar}
_DIVS = {operator.truediv, torch.div, torch.true_divide, _ATEN.div.Tensor, _ATEN.div.Scalar}
_NEGS = {operator.neg, torch.neg, _ATEN.neg.default}
"""Python, torch and aten (a graph from torch.export, see reparam.exported_graph) spellings of each op; export
records `out += y` as add_, which a sum accepts only where nothing else reads `out` (inner nodes have one user)."""
_NONLINEAR = {"relu", "relu6", "sigmoid", "tanh", "gelu", "silu", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu",
              "elu", "selu", "celu", "mish", "softplus", "softsign", "prelu", "rrelu", "glu", "logsigmoid", "softmax",
              "log_softmax", "threshold", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d",
              "adaptive_max_pool2d", "adaptive_max_pool3d", "abs", "sign", "clamp", "clip", "exp", "log", "sqrt",
              "rsqrt", "square", "erf", "sin", "cos", "dropout"}
"""Names (functions, methods, aten ops) of ops known not to be linear in their input, for the refusal reason."""
_MAX_CLIMB = 8
"""Ops walked up from a stopped term when looking for the group input it reaches (for the refusal reason)."""


@dataclass
class Step:
    """One linear op of a branch: kind is 'conv', 'bn', 'scale' or 'pass' (nn.Identity)."""

    kind: str
    node: fx.Node
    module: nn.Module | None = None
    factor: float = 1.0
    stats: BNStats | None = None
    """An F.batch_norm call's statistics (module BNs read theirs from `module`)."""
    label: str | None = None
    attrs: list[fx.Node] = field(default_factory=list)
    """get_attr nodes only this step reads (an F.batch_norm call's tensors)."""

    @property
    def name(self) -> str:
        if self.label is not None:
            return self.label
        return str(self.node.target) if self.node.op == "call_module" else self.node.name


@dataclass
class Branch:
    """One term of a sum as a chain of linear steps (execution order) applied to `base`, times `coeff`."""

    term: Any
    coeff: float
    base: Any
    steps: list[Step] = field(default_factory=list)
    problem: str | None = None

    @property
    def conv(self) -> Step | None:
        return next((s for s in self.steps if s.kind == "conv"), None)

    def describe(self) -> str:
        """'rbr_1x1.conv -> rbr_1x1.bn', '0.5 * scale.conv', 'identity' for reports and manifests."""
        parts = [s.name for s in self.steps if s.kind in ("conv", "bn")]
        factor = self.coeff
        for step in self.steps:
            factor *= step.factor if step.kind == "scale" else 1.0
        text = " -> ".join(parts) if parts else "identity"
        return text if factor == 1.0 else f"{factor:g} * {text}"


@dataclass
class Sum:
    """A top-level sum: its add/sub nodes, its terms (constant 0 dropped) and the groups of its terms by base."""

    top: fx.Node
    nodes: list[fx.Node]
    branches: list[Branch]
    refused: list[str] = field(default_factory=list)

    def where(self) -> str:
        stack = self.top.meta.get("nn_module_stack")
        path = list(stack.values())[-1][0] if stack else ""
        return f"{path} ({self.top.name})" if path else self.top.name


def _binary_sum(node: fx.Node) -> tuple[Any, Any, float] | None:
    """(lhs, rhs, sign of rhs) for a plain two-operand add/sub node, else None."""
    if node.kwargs or len(node.args) != 2:
        return None
    if node.op == "call_function" and node.target in _ADDS | _SUBS:
        sign = 1.0 if node.target in _ADDS else -1.0
    elif node.op == "call_method" and node.target in ("add", "sub"):
        sign = 1.0 if node.target == "add" else -1.0
    else:
        return None
    lhs, rhs = node.args
    if not isinstance(lhs, fx.Node) and not isinstance(rhs, fx.Node):
        return None
    return lhs, rhs, sign


def _scalar(arg: Any, gm: fx.GraphModule) -> float | None:
    """A Python number or a 0-dim real tensor attribute, as a float; else None."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return float(arg)
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        try:
            value = _attr(gm, str(arg.target))
        except AttributeError:
            return None
        if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
            return float(value)
    return None


def _attr(gm: fx.GraphModule, target: str) -> Any:
    owner_path, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    return getattr(owner, leaf)


def _is_method(node: fx.Node, names: tuple[str, ...]) -> bool:
    return node.op == "call_method" and node.target in names


def _scale_step(node: fx.Node, gm: fx.GraphModule) -> tuple[Any, float] | None:
    """(tensor input, factor) for x * c, c * x, x / c, -x with a scalar c."""
    if node.kwargs:
        return None
    args = node.args
    if (node.op == "call_function" and node.target in _NEGS or _is_method(node, ("neg",))) and len(args) == 1:
        return args[0], -1.0
    if len(args) != 2:
        return None
    if node.op == "call_function" and node.target in _MULS or _is_method(node, ("mul",)):
        for data, other in ((args[0], args[1]), (args[1], args[0])):
            factor = _scalar(other, gm)
            if isinstance(data, fx.Node) and factor is not None and (not isinstance(other, fx.Node) or data is not other):
                return data, factor
    if node.op == "call_function" and node.target in _DIVS or _is_method(node, ("div", "true_divide")):
        factor = _scalar(args[1], gm)
        if isinstance(args[0], fx.Node) and factor:
            return args[0], 1.0 / factor
    return None


def data_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not metadata_read(u)]


def _module_bn_stats(module: nn.Module) -> BNStats | None:
    """A BatchNorm(-like) module's statistics when the whole call is affine: a registered look-alike
    (bnstrip.trace.bn_registry) counts only if what it applies after normalising is the identity."""
    from bnstrip.trace.bn_registry import batchnorm_entry, module_stats

    entry = batchnorm_entry(module)
    if entry is None:
        return None
    if entry.post is not None:
        tail = entry.post(module)
        if any(type(m).forward is not nn.Identity.forward for m in list(tail.modules())[1:]):
            return None  # an activation (or dropout) after the normalisation: not linear
    return module_stats(module)


def _functional_step(node: fx.Node, gm: fx.GraphModule) -> tuple[Step, Any] | None:
    """An eval F.batch_norm on module tensors (timm's BatchNormAct2d), as a BN step."""
    name, spec = functional_bn(node, gm, "")
    data = node.args[0] if node.args else node.kwargs.get("input")
    if spec.refusal is not None or not isinstance(data, fx.Node):
        return None
    stats = BNStats(_attr(gm, spec.mean), _attr(gm, spec.var), _attr(gm, spec.weight) if spec.weight else None,
                    _attr(gm, spec.bias) if spec.bias else None, spec.eps)
    attrs = [n for n in node.all_input_nodes if n.op == "get_attr"]
    owner, _, leaf = spec.mean.rpartition(".")
    if owner and leaf == "running_mean" and spec.var == f"{owner}.running_var":
        name = owner  # the BatchNorm module it belongs to (in a GraphModule that module is an empty shell)
    return Step("bn", node, stats=stats, label=name, attrs=attrs), data


def linear_step(node: fx.Node, gm: fx.GraphModule) -> tuple[Step, Any] | None:
    """(step, its tensor input) when `node` is one linear op a branch may contain, else None."""
    if is_functional_bn(node):
        return _functional_step(node, gm)
    if node.op == "call_module":
        if node.kwargs or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            return None
        module = gm.get_submodule(str(node.target))
        if isinstance(module, _ConvNd) and not isinstance(module, _ConvTransposeNd) and layer_refusal(module) is None:
            return Step("conv", node, module), node.args[0]
        if bn_refusal(module) is None and not module.training and (stats := _module_bn_stats(module)) is not None:
            return Step("bn", node, module, stats=stats), node.args[0]
        if type(module).forward is nn.Identity.forward:
            return Step("pass", node, module), node.args[0]
        return None
    found = _scale_step(node, gm)
    if found is None:
        return None
    data, factor = found
    return Step("scale", node, factor=factor), data


def _walk(term: Any, coeff: float, gm: fx.GraphModule) -> Branch:
    """Follow `term` back through linear steps that have no other user; where it stops is the base."""
    steps: list[Step] = []
    node = term
    while isinstance(node, fx.Node) and len(data_users(node)) == 1:
        found = linear_step(node, gm)
        if found is None:
            break
        step, node = found
        steps.append(step)
    branch = Branch(term=term, coeff=coeff, base=node, steps=steps[::-1])
    branch.problem = _order_problem(branch.steps)
    return branch


def _order_problem(steps: list[Step]) -> str | None:
    """Scalars may come before the conv; a BatchNorm before it is not exact (padding), two convs do not merge."""
    convs = [s for s in steps if s.kind == "conv"]
    if len(convs) > 1:
        return f"{convs[0].name} and {convs[1].name} are two convs in a row in one branch"
    if convs:
        before = steps[:steps.index(convs[0])]
        bn = next((s for s in before if s.kind == "bn"), None)
        if bn is not None:
            return (f"BatchNorm {bn.name} comes before {convs[0].name} in its branch; with padding its shift "
                    "would reach the border differently")
    return None


def _through_identities(node: Any, gm: fx.GraphModule) -> tuple[Any, list[fx.Node]]:
    """Skip nn.Identity calls (timm's drop_path at rate 0) that are the only user of what they pass on."""
    passed: list[fx.Node] = []
    while isinstance(node, fx.Node) and len(node.users) == 1 and node.op == "call_module":
        found = linear_step(node, gm)
        if found is None or found[0].kind != "pass" or len(found[1].users) != 1:
            break
        passed.append(node)
        node = found[1]
    return node, passed


def _flatten(top: fx.Node, gm: fx.GraphModule) -> tuple[list[fx.Node], list[tuple[Any, float]]]:
    """The add/sub nodes of the tree under `top` and its terms with their signs (constant zeros dropped)."""
    nodes: list[fx.Node] = []
    terms: list[tuple[Any, float]] = []

    def visit(node: fx.Node, sign: float) -> None:
        nodes.append(node)
        lhs, rhs, rhs_sign = _binary_sum(node)  # type: ignore[misc]
        for operand, s in ((lhs, sign), (rhs, sign * rhs_sign)):
            inner, passed = _through_identities(operand, gm)
            if isinstance(inner, fx.Node) and len(inner.users) == 1 and _binary_sum(inner) is not None:
                nodes.extend(passed)
                visit(inner, s)
            elif not (isinstance(operand, (int, float)) and not isinstance(operand, bool) and operand == 0):
                terms.append((operand, s))

    visit(top, 1.0)
    return nodes, terms


def _is_inner(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether `node` (a sum) is flattened into the sum that uses it (maybe through nn.Identity calls)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op in ("call_function", "call_method") and _binary_sum(user) is not None:
            return True
        found = linear_step(user, gm) if user.op == "call_module" else None
        if found is None or found[0].kind != "pass":
            return False
        node = user
    return False


def find_sums(gm: fx.GraphModule) -> list[Sum]:
    """Every top-level sum of the graph with at least one group that holds a conv, in graph order."""
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    read_attrs = [str(n.target) for n in gm.graph.nodes if n.op == "get_attr" and n.users]
    sums: list[Sum] = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or _binary_sum(node) is None or _is_inner(node, gm):
            continue
        nodes, terms = _flatten(node, gm)
        branches = [_walk(term, sign, gm) if isinstance(term, fx.Node) else Branch(term, sign, None)
                    for term, sign in terms]
        for branch in branches:
            branch.problem = branch.problem or _module_problem(branch, calls, read_attrs)
        found = Sum(top=node, nodes=nodes, branches=branches)
        bases = {id(b.base) for b in branches if b.conv is not None and b.base is not None}
        if bases:
            found.refused = _foreign_reasons(found, bases, gm)
            sums.append(found)
    return sums


def _module_problem(branch: Branch, calls: Counter, read_attrs: list[str]) -> str | None:
    for step in branch.steps:
        if step.kind not in ("conv", "bn") or step.node.op != "call_module":
            continue
        if calls[step.name] > 1:
            return f"{step.name} is called {calls[step.name]} times, so it cannot be merged away"
        if any(attr.startswith(step.name + ".") for attr in read_attrs):
            return f"the forward reads {step.name}'s tensors directly, so it cannot be merged away"
    return None


def _users_text(node: fx.Node) -> str:
    return ", ".join(u.name for u in list(node.users)[:3])


def _foreign_reasons(found: Sum, bases: set[int], gm: fx.GraphModule) -> list[str]:
    """Why terms that reach a group's input by another path (a nonlinearity, a shared output) are not merged."""
    reasons: list[str] = []
    for branch in found.branches:
        base = branch.base
        if not isinstance(base, fx.Node) or id(base) in bases:
            continue
        node, path = base, [base]
        for _ in range(_MAX_CLIMB):
            inputs = [n for n in node.all_input_nodes if n.op != "get_attr"]
            if len(inputs) != 1:
                break
            node = inputs[0]
            if id(node) in bases:
                reasons.append(_foreign_reason(base, path, node, gm))
                break
            path.append(node)
    return reasons


def _op_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _nonlinear(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True for an op known not to be linear in its input (an activation, max-pooling, exp, ...)."""
    if node.op == "call_module":
        module = _attr(gm, str(node.target))
        return type(module).__module__ in ("torch.nn.modules.activation", "torch.nn.modules.dropout") or \
            isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                                nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d))
    if node.op == "call_method":
        return str(node.target).rstrip("_") in _NONLINEAR
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "").split(".")[0]  # aten ops: "relu.default"
        return name.rstrip("_") in _NONLINEAR
    return False


def _foreign_reason(base: fx.Node, path: list[fx.Node], start: fx.Node, gm: fx.GraphModule) -> str:
    """Why a branch from `start` up to `base` (ops in `path`, top first) cannot join the merge: the true cause."""
    if len(base.users) > 1 and linear_step(base, gm) is not None:
        return f"the output of {_op_name(base)} also feeds {_users_text(base)}, so its branch cannot be merged away"
    bad = next((n for n in path if _nonlinear(n, gm)), None)
    if bad is not None:
        return f"the branch through {_op_name(bad)} is not linear in {start.name}: a nonlinearity sits inside it"
    return (f"the branch goes through {_op_name(base)}, which is not a conv, BatchNorm, identity or scalar scale, "
            "so it cannot be merged into one conv")
