"""The small data-flow graph that folding needs: Op, OpGraph, and ops read from an fx graph.

Folding is only exact when a BatchNorm reads the output of one Conv/Linear call and
nothing else reads it, so the rules work on real data flow, not module order.
"""
from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from bnstrip._torch import BatchNormBase as _BatchNorm
from bnstrip._torch import ConvNd as _ConvNd

from bnstrip.errors import first_line
from bnstrip.trace.bn_registry import is_batchnorm_like
from bnstrip.trace.classify import bn_refusal, layer_kind, layer_refusal, own_forward_note

@dataclass
class FunctionalBN:
    """An `F.batch_norm` call whose statistics are attributes of the traced module (paths relative to it)."""

    mean: str
    var: str
    weight: str | None
    bias: str | None
    eps: float
    refusal: str | None = None


@dataclass(eq=False)
class Op:
    """One call in the data flow: a layer, a BatchNorm, or anything else ('other')."""

    name: str
    kind: str
    label: str
    module: nn.Module | None = None
    inputs: list[Op] = field(default_factory=list)
    users: list[Op] = field(default_factory=list)
    rank: int | None = None
    node: fx.Node | None = None
    functional: FunctionalBN | None = None
    note: str | None = None
    own_forward: str | None = None
    """For a 'layer' whose class overrides forward (Conv2dSame): it may only absorb a BatchNorm after it,
    and only where a real run checks the fold (see OpGraph.example_run)."""

    def __repr__(self) -> str:
        return f"Op({self.kind} {self.name})"


@dataclass
class OpGraph:
    """The ops in execution order plus what the rules need to know about modules."""

    ops: list[Op]
    tracer: str
    calls: Counter = field(default_factory=Counter)
    refusals: dict[str, str] = field(default_factory=dict)
    untraced: dict[str, str] = field(default_factory=dict)
    gm: fx.GraphModule | None = None
    traced: set[str] = field(default_factory=set)
    model_output: Any = None
    """The model's own output on the example inputs (seeded run), when a tracer ran it."""
    input_written: dict[str, str] = field(default_factory=dict)
    """BatchNorm modules whose input the real run changed in place after they ran (see _RunWatcher)."""
    sees_inplace: bool = True
    """False for an fx graph never checked against a real run: fx records `x += y` as an out-of-place add."""
    example_run: bool = False
    """True when the graph was built with example inputs, so fold_model checks the folded model on them."""
    proofs: dict[tuple[str, str], str | None] = field(default_factory=dict)
    """(layer, BatchNorm) -> bnstrip.fold.proof's verdict, so that each own-forward fold is proven once."""


def join_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _bind_functional_bn(node: fx.Node) -> dict[str, Any]:
    if node.target is F.batch_norm:
        bound = inspect.signature(F.batch_norm).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    names = ["input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled"]
    values = dict(zip(names, node.args, strict=False))  # the call may pass fewer positionally
    values.update(node.kwargs)
    return values


def is_functional_bn(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm)


def functional_bn(node: fx.Node, gm: fx.GraphModule, prefix: str,
                   root: nn.Module | None = None) -> tuple[str, FunctionalBN]:
    """Name and description of an F.batch_norm call; `refusal` says why it cannot be folded."""
    args = _bind_functional_bn(node)
    paths: dict[str, str | None] = {}
    refusal = None
    for key in ("running_mean", "running_var", "weight", "bias"):
        value = args.get(key)
        if value is None:
            paths[key] = None
        elif isinstance(value, fx.Node) and value.op == "get_attr":
            paths[key] = str(value.target)
            others = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == value.target and n is not value]
            if len(value.users) > 1 or others:
                refusal = f"its {key} tensor {value.target} is also used elsewhere"
        else:
            paths[key] = None
            refusal = f"its {key} is computed in forward, not a module attribute"
    training = args.get("training", False)
    eps = args.get("eps", 1e-5)
    if paths["running_mean"] is None or paths["running_var"] is None:
        refusal = refusal or "it has no running statistics (running_mean/running_var is None), so it uses batch statistics"
    if not isinstance(training, bool):
        refusal = refusal or "its training flag is computed in forward"
    elif training:
        refusal = refusal or "it is called with training=True, so it normalises with batch statistics even in eval mode"
    if not isinstance(eps, (int, float)):
        refusal = refusal or "its eps is computed in forward"
        eps = 0.0
    mean_path = paths["running_mean"] or node.name
    owner_path, _, leaf = mean_path.rpartition(".")
    name = f"F.batch_norm@{join_name(prefix, mean_path)}"
    if paths["running_mean"] is not None and leaf == "running_mean" and paths["running_var"] == join_name(owner_path, "running_var"):
        try:
            # The traced module itself, when given: a GraphModule keeps only the attributes the graph reads,
            # in plain Module shells, so a BatchNorm subclass that calls F.batch_norm would lose its class.
            base = gm if root is None else root
            owner = base.get_submodule(owner_path) if owner_path else base
        except AttributeError:
            owner = None
        if isinstance(owner, _BatchNorm) and owner_path:
            name = join_name(prefix, owner_path)
    spec = FunctionalBN(mean=paths["running_mean"] or "", var=paths["running_var"] or "", weight=paths["weight"],
                        bias=paths["bias"], eps=float(eps), refusal=refusal)
    return name, spec


def shape_rank(node: fx.Node) -> int | None:
    if "val_rank" in node.meta:
        return node.meta["val_rank"]
    shape = getattr(node.meta.get("val"), "shape", None)
    return len(shape) if shape is not None else None


def ops_from_fx(gm: fx.GraphModule, prefix: str = "", where: str = "the model",
                root: nn.Module | None = None) -> list[Op]:
    """Ops of an fx graph whose call_module leaves are BehaviourTracer's; names are prefixed with `prefix`."""
    ops: list[Op] = []
    by_node: dict[fx.Node, Op] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            op = Op(name=join_name(prefix, node.name), kind="other", label=f"the input of {where}")
        elif node.op == "output":
            op = Op(name=join_name(prefix, "output"), kind="other", label=f"the output of {where}")
        elif node.op == "get_attr":
            op = Op(name=join_name(prefix, str(node.target)), kind="other", label=f"attribute {join_name(prefix, str(node.target))}")
        elif node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            name = join_name(prefix, str(node.target))
            label = f"{name} ({type(module).__name__})"
            if layer_kind(module) is not None and (own := own_forward_note(module)) is not None:
                op = Op(name=name, kind="layer", label=label, module=module, own_forward=own)
            elif layer_kind(module) is not None:
                note = layer_refusal(module)
                op = Op(name=name, kind="other" if note else "layer", label=label, module=module, note=note)
            elif is_batchnorm_like(module):
                note = bn_refusal(module)
                op = Op(name=name, kind="bn", label=label, module=module, note=note)
            else:
                op = Op(name=name, kind="other", label=label, module=module)
        elif is_functional_bn(node):
            name, spec = functional_bn(node, gm, prefix, root)
            op = Op(name=name, kind="bn", label=f"{name} (F.batch_norm)", functional=spec, note=spec.refusal)
        else:
            op = Op(name=join_name(prefix, node.name), kind="other", label=call_label(node, prefix),
                    note=_inlined_layer_note(node))
        op.node = node
        op.rank = shape_rank(node)
        by_node[node] = op
        if op.functional is not None:
            data = node.args[0] if node.args else node.kwargs.get("input")
            op.inputs = [by_node[data]] if isinstance(data, fx.Node) else []
        else:
            op.inputs = [by_node[n] for n in node.all_input_nodes]
        ops.append(op)
    link_users(ops)
    return ops


def _inlined_layer_note(node: fx.Node) -> str | None:
    """A Conv/Linear subclass that fx traced through has its own forward: say so in the reason."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    cls = list(stack.values())[-1][1]
    if isinstance(cls, type) and issubclass(cls, (_ConvNd, nn.Linear)):
        return f"{cls.__name__} overrides forward, so it is not a plain {cls.__mro__[1].__name__}"
    return None


def call_label(node: fx.Node, prefix: str) -> str:
    """'relu', 'add', or 'conv2d inside conv_ws (WeightStdConv)' for reasons a user can act on."""
    target = node.target
    text = getattr(target, "_opname", None) or getattr(target, "__name__", None) or str(target)
    if node.op == "call_method":
        text = f".{text}()"
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        if path:
            cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
            return f"{text} inside {join_name(prefix, path)} ({cls_name.rsplit('.', 1)[-1]})"
    return text


def link_users(ops: list[Op]) -> None:
    for op in ops:
        for source in op.inputs:
            if op not in source.users:
                source.users.append(op)


def module_calls(ops: Sequence[Op]) -> Counter:
    return Counter(op.name for op in ops if op.module is not None or op.functional is not None)


def shapes_text(example_inputs: Sequence[torch.Tensor]) -> str:
    return ", ".join(str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in example_inputs)


def error_summary(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    first = first_line(exc, 200, "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
