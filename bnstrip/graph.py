"""Turn a model into the small data-flow graph that BatchNorm folding needs.

Folding is only exact when a BatchNorm reads the output of one Conv/Linear call and
nothing else reads it, so we need the real data flow, not module order. Three
tracers, tried in this order:

* torch.fx symbolic tracing of the whole model (complete graph, and the only one
  that lets us delete functional ``F.batch_norm`` calls);
* torch.export on example inputs (handles Python control flow on shapes);
* fx tracing of every submodule that fx can trace, when the control flow depends on
  tensor values; calls made from the untraceable code are counted at run time so a
  module called from there is never folded.

Modules are recognised by behaviour: a Conv/Linear/BatchNorm subclass counts only if
its forward is PyTorch's own, it has no hooks, and its weight is a plain Parameter.

A traced graph can hide what the model really does, so with example inputs the model is
also run once for real (observe_run): an fx graph whose outputs differ from the forward's is
not used; tensors of foldable modules read outside their own forward, modules called more
often than traced, and in-place writes into a BatchNorm's input (fx records `x += y` as an
out-of-place add) become refusals. Statically, tensors that share memory (tied weights) and
get_attr reads of a module's tensors are refused too.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.utils._python_dispatch import TorchDispatchMode

from bnstrip.errors import InputError, first_line

_CONV_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}
_CONV_IMPLS = {nn.Conv1d._conv_forward, nn.Conv2d._conv_forward, nn.Conv3d._conv_forward}
_CONVT_FORWARDS = {nn.ConvTranspose1d.forward, nn.ConvTranspose2d.forward, nn.ConvTranspose3d.forward}
_BN_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}


# --------------------------------------------------------------------------- what a module is


def layer_kind(module: nn.Module) -> str | None:
    """'conv', 'convT' or 'linear' by isinstance (subclasses included), else None."""
    if isinstance(module, _ConvTransposeNd):
        return "convT"
    if isinstance(module, _ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def has_hooks(module: nn.Module) -> bool:
    """Forward hooks on this module, or global ones (register_module_forward_hook) that run on every module."""
    from torch.nn.modules import module as module_globals

    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_backward_hooks", None)
                or getattr(module, "_forward_hooks_with_kwargs", None)
                or module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks)


def _hook_note(module: nn.Module) -> str:
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return ("global module hooks are registered (register_module_forward_hook/_pre_hook) and may change its "
                "output; remove them before folding")
    return f"{type(module).__name__} has hooks that may change its output"


def _plain_tensor_attr(module: nn.Module, name: str) -> bool:
    """True when `name` is a real Parameter/buffer slot (not a parametrization or property)."""
    return name in module._parameters or name in module._buffers


def layer_refusal(module: nn.Module) -> str | None:
    """Why this Conv/ConvTranspose/Linear cannot be folded into, or None when it behaves like PyTorch's."""
    kind = layer_kind(module)
    if kind is None:
        return f"{type(module).__name__} is not a Conv, ConvTranspose or Linear"
    cls = type(module)
    if kind == "conv" and (cls.forward not in _CONV_FORWARDS or cls._conv_forward not in _CONV_IMPLS):
        return f"{cls.__name__} overrides forward, so its output is not a plain convolution"
    if kind == "convT" and cls.forward not in _CONVT_FORWARDS:
        return f"{cls.__name__} overrides forward, so its output is not a plain transposed convolution"
    if kind == "linear" and cls.forward is not nn.Linear.forward:
        return f"{cls.__name__} overrides forward, so its output is not a plain linear map"
    if has_hooks(module):
        return _hook_note(module)
    if "weight" not in module._parameters or module._parameters["weight"] is None:
        return f"{cls.__name__}'s weight is not a plain Parameter (parametrized or missing)"
    if "bias" not in module._parameters:
        return f"{cls.__name__}'s bias is not a plain Parameter (parametrized)"
    weight = module._parameters["weight"]
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return f"{cls.__name__} is a lazy module that was never run"
    if not weight.is_floating_point():
        return f"{cls.__name__}'s weight is {weight.dtype}, not floating point"
    return None


def bn_refusal(module: nn.Module) -> str | None:
    """Why this BatchNorm module cannot be folded away, or None when it is a plain eval-mode BatchNorm."""
    if not isinstance(module, _BatchNorm):
        return f"{type(module).__name__} is not a BatchNorm"
    cls = type(module)
    if cls.forward not in _BN_FORWARDS:
        return f"{cls.__name__} overrides forward, so it is not a plain BatchNorm"
    if has_hooks(module):
        return _hook_note(module)
    if module._buffers.get("running_mean") is None or module._buffers.get("running_var") is None:
        return "it has no running statistics (track_running_stats=False), so it normalises with batch statistics even in eval mode"
    for name in ("running_mean", "running_var"):
        if not _plain_tensor_attr(module, name):
            return f"its {name} is not a plain buffer"
    if module.affine and not (_plain_tensor_attr(module, "weight") and _plain_tensor_attr(module, "bias")):
        return "its weight/bias are not plain Parameters (parametrized)"
    return None


def bn_fixed_rank(module: nn.Module | None) -> int | None:
    """The only input rank a BatchNorm class accepts, when there is just one (2d: 4, 3d: 5)."""
    if isinstance(module, nn.BatchNorm2d):
        return 4
    if isinstance(module, nn.BatchNorm3d):
        return 5
    return None


# --------------------------------------------------------------------------- the graph


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
    inputs: list["Op"] = field(default_factory=list)
    users: list["Op"] = field(default_factory=list)
    rank: int | None = None
    node: fx.Node | None = None
    functional: FunctionalBN | None = None
    note: str | None = None

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


class BehaviourTracer(fx.Tracer):
    """fx tracer that keeps plain Conv/Linear/BatchNorm (subclasses too) as leaves, plus any opaque modules."""

    def __init__(self, opaque: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.opaque = opaque
        # Buffers read as attributes become get_attr nodes instead of constants baked in at trace time,
        # so code that reads a BatchNorm's running_var outside its call shows up in the graph.
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.opaque:
            return True
        if layer_kind(m) is not None and layer_refusal(m) is None:
            return True
        if isinstance(m, _BatchNorm) and bn_refusal(m) is None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def fx_trace(model: nn.Module, opaque: frozenset[int] = frozenset()) -> tuple[fx.GraphModule | None, BehaviourTracer, BaseException | None]:
    """(GraphModule, tracer, None) or (None, tracer, error); the tracer's module_stack says where it failed."""
    tracer = BehaviourTracer(opaque)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, ... from user code
        return None, tracer, exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__), tracer, None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _bind_functional_bn(node: fx.Node) -> dict[str, Any]:
    if node.target is F.batch_norm:
        bound = inspect.signature(F.batch_norm).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    names = ["input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled"]
    values = dict(zip(names, node.args))
    values.update(node.kwargs)
    return values


def is_functional_bn(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm)


def _functional_bn(node: fx.Node, gm: fx.GraphModule, prefix: str) -> tuple[str, FunctionalBN]:
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
    name = f"F.batch_norm@{_join(prefix, mean_path)}"
    if paths["running_mean"] is not None and leaf == "running_mean" and paths["running_var"] == _join(owner_path, "running_var"):
        try:
            owner = gm.get_submodule(owner_path) if owner_path else gm
        except AttributeError:
            owner = None
        if isinstance(owner, _BatchNorm) and owner_path:
            name = _join(prefix, owner_path)
    spec = FunctionalBN(mean=paths["running_mean"] or "", var=paths["running_var"] or "", weight=paths["weight"],
                        bias=paths["bias"], eps=float(eps), refusal=refusal)
    return name, spec


def _shape_rank(node: fx.Node) -> int | None:
    if "val_rank" in node.meta:
        return node.meta["val_rank"]
    shape = getattr(node.meta.get("val"), "shape", None)
    return len(shape) if shape is not None else None


def ops_from_fx(gm: fx.GraphModule, prefix: str = "", where: str = "the model") -> list[Op]:
    """Ops of an fx graph whose call_module leaves are BehaviourTracer's; names are prefixed with `prefix`."""
    ops: list[Op] = []
    by_node: dict[fx.Node, Op] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            op = Op(name=_join(prefix, node.name), kind="other", label=f"the input of {where}")
        elif node.op == "output":
            op = Op(name=_join(prefix, "output"), kind="other", label=f"the output of {where}")
        elif node.op == "get_attr":
            op = Op(name=_join(prefix, str(node.target)), kind="other", label=f"attribute {_join(prefix, str(node.target))}")
        elif node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            name = _join(prefix, str(node.target))
            label = f"{name} ({type(module).__name__})"
            if layer_kind(module) is not None:
                note = layer_refusal(module)
                op = Op(name=name, kind="other" if note else "layer", label=label, module=module, note=note)
            elif isinstance(module, _BatchNorm):
                note = bn_refusal(module)
                op = Op(name=name, kind="bn", label=label, module=module, note=note)
            else:
                op = Op(name=name, kind="other", label=label, module=module)
        elif is_functional_bn(node):
            name, spec = _functional_bn(node, gm, prefix)
            op = Op(name=name, kind="bn", label=f"{name} (F.batch_norm)", functional=spec, note=spec.refusal)
        else:
            op = Op(name=_join(prefix, node.name), kind="other", label=_call_label(node, prefix),
                    note=_inlined_layer_note(node))
        op.node = node
        op.rank = _shape_rank(node)
        by_node[node] = op
        if op.functional is not None:
            data = node.args[0] if node.args else node.kwargs.get("input")
            op.inputs = [by_node[data]] if isinstance(data, fx.Node) else []
        else:
            op.inputs = [by_node[n] for n in node.all_input_nodes]
        ops.append(op)
    _link_users(ops)
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


def _call_label(node: fx.Node, prefix: str) -> str:
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
            return f"{text} inside {_join(prefix, path)} ({cls_name.rsplit('.', 1)[-1]})"
    return text


def _link_users(ops: list[Op]) -> None:
    for op in ops:
        for source in op.inputs:
            if op not in source.users:
                source.users.append(op)


_VIEW_NAMES = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "swapaxes", "swapdims", "permute",
    "t", "narrow", "select", "squeeze", "unsqueeze", "expand", "expand_as", "as_strided", "split", "chunk", "unbind",
    "tensor_split", "detach", "contiguous", "getitem", "movedim", "moveaxis", "diagonal", "unfold", "view_as_real",
    "view_as_complex", "real", "imag", "split_with_sizes", "hsplit", "vsplit", "dsplit", "adjoint", "mT", "mH",
    "T", "H",
    "data", "align_as", "rename", "type_as", "to", "float", "double", "half", "bfloat16", "cpu", "cuda", "clone_view",
}
"""Calls whose result may share memory with their first argument (`to`/`float` do when nothing changes)."""


def _call_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.ilshift, operator.irshift, operator.iand, operator.ior,
                      operator.ixor, operator.imatmul, operator.setitem}


def _writes_first_argument(op: Op) -> bool:
    """Whether this op may change its first input in place (x.add_(), x += y, x[i] = v, ReLU(inplace=True), ...)."""
    node = op.node
    if node is None or node.op not in ("call_method", "call_function", "call_module"):
        return False
    if node.op == "call_module":
        return getattr(op.module, "inplace", False) is True
    schema = getattr(node.target, "_schema", None)
    if schema is not None:  # an aten overload (torch.export): its schema says which arguments it writes
        return bool(schema.arguments) and schema.arguments[0].alias_info is not None \
            and schema.arguments[0].alias_info.is_write
    name = _call_name(node)
    if node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("_")):
        return True
    if node.op == "call_function" and callable(node.target):
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        except (TypeError, ValueError):
            return bool(node.kwargs.get("inplace"))
        return bound.arguments.get("inplace") is True
    return False



def _returns_alias(op: Op) -> bool:
    node = op.node
    if node is None or node.op not in ("call_method", "call_function"):
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return any(r.alias_info is not None for r in schema.returns)
    return _call_name(node) in _VIEW_NAMES


def _writer_below(source: Op, skip: Op | None, depth: int) -> Op | None:
    if depth > 16:
        return source
    for user in source.users:
        if user is skip or not user.inputs or user.inputs[0] is not source:
            continue
        if _writes_first_argument(user):
            return user
        if _returns_alias(user) and (found := _writer_below(user, skip, depth + 1)) is not None:
            return found
    return None


def alias_base(op: Op) -> Op:
    """The op whose output `op`'s output is a view of (itself when it is no view)."""
    for _ in range(16):
        if not (_returns_alias(op) and op.inputs):
            return op
        op = op.inputs[0]
    return op


def writer_of(source: Op, skip: Op | None = None) -> Op | None:
    """An op that may change `source`'s output in place: through it, a view of it, or the tensor it is a view of."""
    return _writer_below(alias_base(source), skip, 0)


def other_readers(source: Op, skip: Op) -> list[Op]:
    """Every op besides `skip` that reads `source`'s memory: its users, and the users of every view of it or of
    the tensor it is a view of."""
    found: list[Op] = []

    def walk(op: Op, depth: int) -> None:
        for user in op.users:
            if user is skip or user in found:
                continue
            if depth < 16 and _returns_alias(user) and user.inputs and user.inputs[0] is op:
                walk(user, depth + 1)
            else:
                found.append(user)

    base = alias_base(source)
    walk(base, 0)
    if base is not source:
        found = [u for u in found if u is not source]
    return found


def module_calls(ops: Sequence[Op]) -> Counter:
    return Counter(op.name for op in ops if op.module is not None or op.functional is not None)


def alias_refusals(model: nn.Module) -> dict[str, str]:
    """Modules registered under several names: folding through one name would change the other's calls."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    refusals = {}
    for aliases in names.values():
        if len(aliases) > 1:
            for name in aliases:
                refusals[name] = f"the same module is registered as {' and '.join(aliases[:3])}"
    return refusals


def _byte_range(tensor: torch.Tensor) -> tuple[int, int, int] | None:
    """(storage address, first byte, one past the last byte) that `tensor` can touch; None when it has no memory."""
    try:
        if tensor.numel() == 0 or tensor.device.type == "meta" or tensor.layout != torch.strided:
            return None
        storage = tensor.untyped_storage().data_ptr()
        start = tensor.data_ptr()
    except (RuntimeError, NotImplementedError, ValueError):  # lazy/uninitialised or exotic tensors
        return None
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
    return storage, start, start + span * tensor.element_size()


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for bag in (module._parameters, module._buffers):
        for attr, tensor in bag.items():
            if isinstance(tensor, torch.Tensor):
                yield attr, tensor


def shared_memory_refusals(model: nn.Module) -> dict[str, str]:
    """Modules whose own parameters/buffers overlap the memory of another tensor of the model (tied weights,
    views of one buffer): folding writes into that memory and would change the other tensor's user too."""
    by_storage: dict[int, list[tuple[int, int, str, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, tensor in _own_tensors(module):
            where = _byte_range(tensor)
            if where is not None:
                by_storage.setdefault(where[0], []).append((where[1], where[2], module_name, attr))
    refusals: dict[str, str] = {}
    for entries in by_storage.values():
        if len(entries) < 2:
            continue
        entries.sort()
        reach_end, reach_name = entries[0][1], _join(entries[0][2], entries[0][3])
        for start, end, module_name, attr in entries[1:]:
            name = _join(module_name, attr)
            if start < reach_end:
                first_owner = reach_name.rpartition(".")[0]
                refusals.setdefault(module_name, f"its {attr} shares memory with {reach_name} (tied or aliased "
                                                 f"tensors), so folding would change {reach_name} too")
                refusals.setdefault(first_owner, f"its {reach_name.rpartition('.')[2]} shares memory with {name} "
                                                 f"(tied or aliased tensors), so folding would change {name} too")
            if end > reach_end:
                reach_end, reach_name = end, name
    return refusals


def module_refusals(model: nn.Module) -> dict[str, str]:
    """Per-module reasons that hold whatever the graph says: aliases and shared memory."""
    return {**shared_memory_refusals(model), **alias_refusals(model)}


@dataclass
class RunRecord:
    """What one real run of the model on the example inputs showed (see observe_run)."""

    output: Any
    calls: Counter
    ranks: dict[str, set[int]]
    foreign_reads: dict[str, str]
    captured: dict[str, tuple[tuple[Any, ...], dict[str, Any], Any]] = field(default_factory=dict)
    input_written: dict[str, str] = field(default_factory=dict)
    """BatchNorm name -> the op that wrote into its input in place after it ran."""


class _RunWatcher(TorchDispatchMode):
    """Watches every op of a real run for two things a traced graph can hide.

    * Reads of a foldable module's parameter/buffer while that module is not the one running
      (a parent calling F.conv2d(x, self.conv.weight), untraceable code reading bn.running_var,
      a hook): that code would see the changed tensors after folding.
    * In-place writes into a BatchNorm's input after the BatchNorm ran (`x += 1`, which fx records
      as an out-of-place add): once the BatchNorm is an identity, its output is that same tensor.
    """

    def __init__(self, watched: dict[int, list[tuple[int, int, str, str]]], stack: list[str]) -> None:
        super().__init__()
        self.watched = watched
        self.stack = stack
        self.found: dict[str, str] = {}
        self.bn_inputs: dict[int, list[tuple[int, int, str]]] = {}
        self.kept_alive: list[torch.Tensor] = []  # so their memory is not reused by later tensors
        self.written: dict[str, str] = {}

    def watch_bn_input(self, tensor: torch.Tensor, name: str) -> None:
        where = _byte_range(tensor)
        if where is not None:
            self.bn_inputs.setdefault(where[0], []).append((where[1], where[2], name))
            self.kept_alive.append(tensor)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        running = self.stack[-1] if self.stack else ""
        for leaf in pytree.tree_leaves((args, kwargs)):
            if not isinstance(leaf, torch.Tensor):
                continue
            where = _byte_range(leaf)
            if where is None or where[0] not in self.watched:
                continue
            for start, end, owner, attr in self.watched[where[0]]:
                if owner != running and start < where[2] and where[1] < end and owner not in self.found:
                    reader = f"{running}'s forward" if running else "the model's forward"
                    self.found[owner] = (f"its {attr} is also read by {reader} (op {func}) at run time, so folding "
                                         "would change what that code computes")
        schema = getattr(func, "_schema", None)
        if self.bn_inputs and schema is not None and schema.is_mutable:
            self._note_writes(func, schema, args, kwargs)
        return func(*args, **kwargs)

    def _note_writes(self, func: Any, schema: Any, args: Any, kwargs: dict[str, Any]) -> None:
        for index, argument in enumerate(schema.arguments):
            info = argument.alias_info
            if info is None or not info.is_write:
                continue
            value = args[index] if index < len(args) else kwargs.get(argument.name)
            for leaf in pytree.tree_leaves(value):
                where = _byte_range(leaf) if isinstance(leaf, torch.Tensor) else None
                if where is None:
                    continue
                for start, end, name in self.bn_inputs.get(where[0], ()):
                    if start < where[2] and where[1] < end:
                        self.written.setdefault(name, str(func))


def observe_run(model: nn.Module, example_inputs: Sequence[Any], watched: Sequence[str],
                capture: set[str] = frozenset()) -> RunRecord:
    """Run `model` once on the example inputs, counting module calls, BatchNorm input ranks, and reads of the
    tensors of the `watched` modules from anywhere but their own forward; keeps a copy of the first call's
    (args, kwargs, output) of each module named in `capture`, as its forward saw and returned them
    (after the module's forward pre-hooks, before its forward hooks): what its fx graph must reproduce."""
    names = {id(m): n for n, m in model.named_modules()}
    captured: dict[str, tuple[tuple[Any, ...], dict[str, Any], Any]] = {}
    calls: Counter = Counter()
    ranks: dict[str, set[int]] = {}
    stack: list[str] = []
    memory: dict[int, list[tuple[int, int, str, str]]] = {}
    for name in watched:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        for attr, tensor in _own_tensors(module):
            where = _byte_range(tensor)
            if where is not None:
                memory.setdefault(where[0], []).append((where[1], where[2], name, attr))

    def enter(module: nn.Module, args: tuple[Any, ...]) -> None:
        name = names[id(module)]
        calls[name] += 1
        stack.append(name)
        if isinstance(module, _BatchNorm) and args and isinstance(args[0], torch.Tensor):
            ranks.setdefault(name, set()).add(args[0].dim())

    def leave(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if stack:
            stack.pop()
        if isinstance(module, _BatchNorm) and args and isinstance(args[0], torch.Tensor):
            mode.watch_bn_input(args[0], names[id(module)])

    def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        name = names[id(module)]
        if name not in captured:  # clones: later in-place ops must not change what we compare against
            captured[name] = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t,
                                             (args, kwargs, output))

    mode = _RunWatcher(memory, stack)
    handles = []
    try:
        for module in model.modules():
            if isinstance(module, torch.jit.ScriptModule):
                continue  # TorchScript modules take no hooks (and are never folded)
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
            if names.get(id(module)) in capture:  # first in line: the raw forward output, before user hooks
                handles.append(module.register_forward_hook(keep, with_kwargs=True, prepend=True))
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            with mode:
                output = model(*fresh_inputs(example_inputs))
    except Exception as exc:
        raise InputError(f"example inputs of shape {_shapes(example_inputs)} do not run through "
                         f"{type(model).__name__}: {_one_line(exc)}; pass the shape the model expects") from None
    finally:
        for handle in handles:
            handle.remove()
    return RunRecord(output=output, calls=calls, ranks=ranks, foreign_reads=mode.found, captured=captured,
                     input_written=mode.written)


def output_leaves(output: Any) -> tuple[Any, list[Any]]:
    """(structure, leaves) of a model output, looking into sequences, mappings, dataclasses and plain objects.

    Two outputs with equal structures can be compared leaf by leaf, whatever containers they use
    (fx's Interpreter returns its own immutable_list/immutable_dict; models return dataclasses).
    """
    leaves: list[Any] = []

    def walk(obj: Any, depth: int) -> Any:
        if isinstance(obj, torch.Tensor) or depth > 32:
            leaves.append(obj)
            return "leaf"
        if isinstance(obj, (list, tuple)):
            return ("seq", len(obj), tuple(walk(item, depth + 1) for item in obj))
        if isinstance(obj, dict):
            return ("map", tuple(map(repr, obj)), tuple(walk(item, depth + 1) for item in obj.values()))
        fields = getattr(obj, "__dict__", None)
        if isinstance(fields, dict) and not isinstance(obj, (type, nn.Module)) and not callable(obj):
            return ("obj", type(obj).__qualname__, tuple(fields), tuple(walk(v, depth + 1) for v in fields.values()))
        leaves.append(obj)
        return "leaf"

    structure = walk(output, 0)
    return structure, leaves


def _tensors_match(expected: Any, got: Any) -> bool:
    """Same structure, same non-tensor leaves, and tensors equal up to float noise."""
    expected_spec, expected_leaves = output_leaves(expected)
    got_spec, got_leaves = output_leaves(got)
    if expected_spec != got_spec:
        return False
    for a, b in zip(expected_leaves, got_leaves):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False
        if not isinstance(a, torch.Tensor):
            try:
                if not bool(a == b):
                    return False
            except Exception:
                return False
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.numel() == 0:
            continue
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return False
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        finite = torch.isfinite(a64)
        if not torch.equal(finite, torch.isfinite(b64)):
            return False
        if not torch.equal(a64[~finite].nan_to_num(), b64[~finite].nan_to_num()):
            return False
        if finite.any():
            scale = max(float(a64[finite].abs().max()), 1.0)
            if float((a64[finite] - b64[finite]).abs().max()) > 1e-6 * scale:
                return False
    return True


# --------------------------------------------------------------------------- fx, whole model


class _RankProp(fx.Interpreter):
    """Run the graph once on the example inputs, recording each node's output rank in node.meta['val_rank']."""

    def __init__(self, gm: fx.GraphModule, model_name: str) -> None:
        super().__init__(gm)
        self.model_name = model_name

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise InputError(f"example inputs of shape {self._shapes} do not run through {self.model_name} "
                             f"(at {n.name}: {_one_line(exc)}); pass the shape the model expects") from None
        if isinstance(result, torch.Tensor):
            n.meta["val_rank"] = result.dim()
        return result

    def propagate(self, example_inputs: Sequence[torch.Tensor]) -> Any:
        self._shapes = _shapes(example_inputs)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)  # the same seed as observe_run, so random ops agree
            return self.run(*fresh_inputs(example_inputs))


class UnfaithfulTrace(Exception):
    """fx's graph computes something else than the model's forward (e.g. isinstance(x, torch.Tensor) is False for
    fx's proxies, so a traced branch differs from the one that really runs)."""


def foldable_module_names(model: nn.Module) -> list[str]:
    """Modules a fold could change: the ones whose tensors must not be read from elsewhere."""
    return [n for n, m in model.named_modules() if layer_kind(m) is not None or isinstance(m, _BatchNorm)]


def runtime_refusals(ops: Sequence[Op], record: RunRecord, graph_calls: Counter) -> dict[str, str]:
    """Reasons found by the real run: a module read from elsewhere, or called another number of times than traced."""
    refusals = dict(record.foreign_reads)
    for op in ops:
        if op.module is None or op.kind not in ("layer", "bn") or op.name in refusals:
            continue
        if record.calls[op.name] != graph_calls[op.name]:
            refusals[op.name] = (f"it runs {record.calls[op.name]} times on the example inputs but the traced graph "
                                 f"calls it {graph_calls[op.name]} times, so code the tracer cannot see also calls it")
    return refusals


def graph_fx(model: nn.Module, example_inputs: Sequence[torch.Tensor] | None) -> tuple[OpGraph | None, BaseException | None]:
    """Whole-model fx graph, or the tracing error.

    With example inputs the graph is run once (output ranks) and checked against one real run of the
    model: a graph that computes something else is rejected (UnfaithfulTrace), and modules whose tensors
    the real run reads from outside their own forward are refused.
    """
    gm, _, error = fx_trace(model)
    if gm is None:
        return None, error
    record = None
    if example_inputs is not None:
        record = observe_run(model, example_inputs, foldable_module_names(model), capture={""})
        args, kwargs, forward_output = record.captured.get("", (tuple(example_inputs), {}, record.output))
        if kwargs:
            return None, UnfaithfulTrace("a forward pre-hook passes keyword arguments to the model's forward")
        traced_output = _RankProp(gm, type(model).__name__).propagate(args)
        if not _tensors_match(forward_output, traced_output):
            return None, UnfaithfulTrace("the traced graph's outputs differ from the model's own on the example "
                                         "inputs (Python code that fx follows differently, e.g. isinstance on a tensor)")
    ops = ops_from_fx(gm)
    calls = module_calls(ops)
    refusals = module_refusals(model)
    for name, reason in attribute_read_refusals(ops, gm).items():
        refusals.setdefault(name, reason)
    if record is not None:
        for name, reason in runtime_refusals(ops, record, calls).items():
            refusals.setdefault(name, reason)
    graph = OpGraph(ops=ops, tracer="torch.fx", calls=calls, refusals=refusals, gm=gm,
                    model_output=None if record is None else record.output,
                    input_written={} if record is None else record.input_written, sees_inplace=record is not None)
    graph.traced = {""}
    return graph, None


_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad", "is_sparse"}
_METADATA_METHODS = {"size", "dim", "numel", "nelement", "element_size", "is_floating_point", "is_complex",
                     "get_device", "is_contiguous", "ndimension"}


def _metadata_only(node: fx.Node | None) -> bool:
    """A use of a tensor that reads its shape/dtype/device only, which folding does not change."""
    if node is None:
        return False
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in _METADATA_ATTRIBUTES
    return node.op == "call_method" and node.target in _METADATA_METHODS


def attribute_read_refusals(ops: Sequence[Op], gm: fx.GraphModule) -> dict[str, str]:
    """Modules whose parameters/buffers the traced code reads directly (get_attr), besides calling the module.

    A functional batch_norm's own statistics are excluded: that call is what gets folded, and
    _functional_bn already refuses statistics that are read anywhere else. So are reads of a
    layer's shape/dtype/device (x.to(self.conv.weight.dtype)), which folding keeps; not of a
    BatchNorm's, whose tensors disappear with it.
    """
    refusals: dict[str, str] = {}
    for op in ops:
        node = op.node
        if node is None or node.op != "get_attr" or not node.users:
            continue  # an unused read (fx records module attribute lookups) cannot change anything
        if all(user.functional is not None for user in op.users):
            continue
        owner_path = str(node.target).rpartition(".")[0]
        try:
            owner_module = gm.get_submodule(owner_path) if owner_path else gm
        except AttributeError:
            owner_module = None
        if not isinstance(owner_module, _BatchNorm) and all(_metadata_only(user.node) for user in op.users):
            continue
        owner, _, attr = op.name.rpartition(".")
        reader = op.users[0].label
        refusals.setdefault(owner, f"its {attr} is also read directly in forward (by {reader}), so folding would "
                                   "change what that code computes")
    return refusals


# --------------------------------------------------------------------------- torch.export


_A = torch.ops.aten
_EXPORT_CONV = {_A.conv1d.default, _A.conv2d.default, _A.conv3d.default, _A.conv1d.padding, _A.conv2d.padding,
                _A.conv3d.padding}
_EXPORT_CONVT = {_A.conv_transpose1d.default, _A.conv_transpose2d.input, _A.conv_transpose3d.input}
_EXPORT_LINEAR = {_A.linear.default}
_EXPORT_BN = {_A.batch_norm.default}
_EXPORT_BN_TUPLE = {_A._native_batch_norm_legit_no_training.default}


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """torch.export logs guard warnings and whole graphs on torch.* loggers; the library must not print."""
    names = ["torch"] + [n for n in logging.Logger.manager.loggerDict if n.startswith("torch.")]
    loggers = [logging.getLogger(n) for n in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # export prints the partial graph of a failure to stderr
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _innermost_module(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path


def graph_export(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> tuple[OpGraph | None, BaseException | None]:
    """Graph from torch.export (aten ops), mapped back to module names through the graph signature."""
    try:
        with _quiet_torch_logs(), torch.no_grad():
            program = torch.export.export(model, tuple(fresh_inputs(example_inputs)), strict=False)
    except Exception as exc:
        return None, exc
    signature = program.graph_signature
    fqn_of = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    ops: list[Op] = []
    by_node: dict[fx.Node, Op] = {}
    modules = dict(model.named_modules())

    def param_module(arg: Any, suffix: str) -> str | None:
        if not isinstance(arg, fx.Node) or arg.op != "placeholder" or arg.name not in fqn_of:
            return None
        fqn = fqn_of[arg.name]
        return fqn[: -len(suffix) - 1] if fqn.endswith("." + suffix) else None

    def sole_user(arg: Any, node: fx.Node) -> bool:
        return not isinstance(arg, fx.Node) or set(arg.users) == {node}

    for node in program.graph.nodes:
        op: Op | None = None
        if node.op == "placeholder":
            if node.name in fqn_of:
                op = Op(name=fqn_of[node.name], kind="other", label=f"parameter {fqn_of[node.name]}")
            else:
                op = Op(name=node.name, kind="other", label="the input of the model")
        elif node.op == "output":
            op = Op(name="output", kind="other", label="the output of the model")
        elif node.op == "call_function" and node.target is operator.getitem and node.args[0] in by_node \
                and by_node[node.args[0]].kind == "bn" and node.args[1] == 0:
            by_node[node] = by_node[node.args[0]]
            by_node[node].node = node
            by_node[node].rank = _shape_rank(node)
            continue
        elif node.op == "call_function" and node.target in _EXPORT_CONV | _EXPORT_CONVT | _EXPORT_LINEAR:
            name = param_module(node.args[1], "weight")
            module = modules.get(name) if name is not None else None
            family = "conv" if node.target in _EXPORT_CONV else "convT" if node.target in _EXPORT_CONVT else "linear"
            bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            note = None
            if module is None:
                note = "its weight is not a module parameter"
            elif layer_kind(module) != family or _innermost_module(node) != name:
                note = f"it is not the forward of {name}"
            elif (note := layer_refusal(module)) is None:
                if not sole_user(node.args[1], node) or not sole_user(bias_arg, node):
                    note = f"the parameters of {name} are also used elsewhere"
                elif (bias_arg is None) != (module.bias is None) or (bias_arg is not None and param_module(bias_arg, "bias") != name):
                    note = f"{name} is called with a bias that is not its own"
            label = f"{name} ({type(module).__name__})" if module is not None else f"{node.target}"
            op = Op(name=name if module is not None else node.name, kind="other" if note else "layer", label=label,
                    module=module, note=note)
        elif node.op == "call_function" and node.target in _EXPORT_BN | _EXPORT_BN_TUPLE:
            tuple_form = node.target in _EXPORT_BN_TUPLE
            mean_arg, var_arg = node.args[3], node.args[4]
            training = False if tuple_form else node.args[5]
            name = param_module(mean_arg, "running_mean")
            module = modules.get(name) if name is not None else None
            note = None
            if module is None or not isinstance(module, _BatchNorm):
                note = "its statistics are not those of a BatchNorm module (a functional batch_norm that only torch.export could trace)"
            elif _innermost_module(node) != name:
                note = f"it is not the forward of {name}"
            elif (note := bn_refusal(module)) is None:
                if training:
                    note = "it runs with training=True"
                elif not all(sole_user(a, node) for a in (node.args[1], node.args[2], mean_arg, var_arg)):
                    note = f"the tensors of {name} are also used elsewhere"
                elif tuple_form and any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
                    note = "its saved statistics are used"
            label = f"{name} ({type(module).__name__})" if module is not None else str(node.target)
            op = Op(name=name if module is not None else node.name, kind="bn", label=label, module=module, note=note)
        else:
            op = Op(name=node.name, kind="other", label=_call_label(node, ""))
        op.node = node
        op.rank = _shape_rank(node)
        op.inputs = [by_node[n] for n in ([node.args[0]] if op.kind in ("layer", "bn") else node.all_input_nodes)
                     if isinstance(n, fx.Node)]
        by_node[node] = op
        ops.append(op)
    _absorb_conv_padding(ops)
    _link_users(ops)
    graph = OpGraph(ops=ops, tracer="torch.export", calls=module_calls(ops),
                    refusals=module_refusals(model))
    graph.traced = {""}
    return graph, None


def _absorb_conv_padding(ops: Sequence[Op]) -> None:
    """Treat the F.pad that a reflect/replicate/circular Conv runs in its own forward as part of the conv.

    torch.export records that padding as a separate op inside the conv's module; without this a
    BatchNorm before such a conv would look like it feeds a pad, not the conv (fx keeps the conv whole).
    """
    for op in ops:
        module = op.module
        if op.kind != "layer" or layer_kind(module) != "conv" or module.padding_mode == "zeros" or not op.inputs:
            continue
        pad = op.inputs[0]
        node = pad.node
        if (pad.kind == "other" and node is not None and node.op == "call_function"
                and _innermost_module(node) == op.name and set(node.users) == {op.node}
                and node.args and isinstance(node.args[0], fx.Node) and len(pad.inputs) >= 1):
            data = next((i for i in pad.inputs if i.node is node.args[0]), None)
            if data is not None:
                op.inputs = [data]
                pad.inputs = []


# --------------------------------------------------------------------------- fx, submodule by submodule


def graph_partial(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> OpGraph:
    """fx graphs of every submodule fx can trace, checked against a real run.

    A module folded inside a traced submodule S must be called exactly once per call of S
    (counted with hooks on the example inputs): otherwise untraced code also calls it. Each
    piece's graph is rerun on the inputs S really got; a piece whose graph computes something
    else is dropped and its children are traced instead. Tensors of foldable modules read by
    code outside their own forward (untraceable code included) are refused.
    """
    leaf_like = (_BatchNorm, _ConvNd, nn.Linear)
    unfaithful: dict[str, str] = {}

    def visit(module: nn.Module, prefix: str, pieces: list[tuple[str, fx.GraphModule]],
              untraced: dict[str, str]) -> None:
        """Trace `module`, making the submodule fx fails in opaque and retrying; else recurse into children."""
        if isinstance(module, torch.jit.ScriptModule):
            untraced[prefix] = "it is a TorchScript module, which bnstrip cannot rewrite"
            return
        error: BaseException | None = None
        if prefix not in unfaithful:
            opaque: set[int] = set()
            while True:
                gm, tracer, error = fx_trace(module, frozenset(opaque))
                if gm is not None:
                    pieces.append((prefix, gm))
                    for name, child in module.named_modules():
                        if id(child) in opaque:
                            visit(child, _join(prefix, name), pieces, untraced)
                    return
                culprit = next(reversed(tracer.module_stack), None) if tracer.module_stack else None
                try:
                    child = module.get_submodule(culprit) if culprit else None
                except (AttributeError, RuntimeError):
                    child = None
                if child is None or child is module or id(child) in opaque:
                    break
                opaque.add(id(child))
        untraced[prefix] = unfaithful.get(prefix) or _one_line(error)
        for name, child in module.named_children():
            if not isinstance(child, leaf_like):
                visit(child, _join(prefix, name), pieces, untraced)

    while True:
        pieces: list[tuple[str, fx.GraphModule]] = []
        untraced: dict[str, str] = {}
        visit(model, "", pieces, untraced)
        record = observe_run(model, example_inputs, foldable_module_names(model), capture={p for p, _ in pieces})
        newly = {prefix: reason for prefix, gm in pieces if (reason := _piece_mismatch(prefix, gm, record))}
        if not newly:
            break
        unfaithful.update(newly)

    ops: list[Op] = []
    calls: Counter = Counter()
    refusals = module_refusals(model)
    for prefix, gm in pieces:
        piece_ops = ops_from_fx(gm, prefix, where=prefix)
        piece_calls = module_calls(piece_ops)
        for op in piece_ops:
            if op.kind == "bn" and op.functional is not None:
                op.note = op.note or f"it is a functional batch_norm inside {prefix}, and only fx on the whole model can remove those"
            if op.module is not None and isinstance(op.module, _BatchNorm):
                seen = record.ranks.get(op.name)
                if seen:
                    op.rank = next(iter(seen)) if len(seen) == 1 else None  # several ranks: not provably one layout
        for name, count in piece_calls.items():
            calls[name] += count
            if count == 1 and record.calls[name] != record.calls[prefix]:
                refusals.setdefault(name, f"it runs {record.calls[name]} times but {prefix} only "
                                          f"{record.calls[prefix]} times, so code fx cannot trace also calls it")
        for name, reason in attribute_read_refusals(piece_ops, gm).items():
            refusals.setdefault(name, reason)
        ops.extend(piece_ops)
    for name, reason in record.foreign_reads.items():
        refusals.setdefault(name, reason)
    graph = OpGraph(ops=ops, tracer="torch.fx (per submodule)", calls=calls, refusals=refusals, untraced=untraced,
                    model_output=record.output, input_written=record.input_written)
    graph.traced = {prefix for prefix, _ in pieces}
    return graph


def _piece_mismatch(prefix: str, gm: fx.GraphModule, record: RunRecord) -> str | None:
    """Why the traced graph of submodule `prefix` is not what its forward computed in the real run, or None."""
    if prefix not in record.captured:
        return None  # not called on the example inputs: nothing to compare against
    args, kwargs, expected = record.captured[prefix]
    try:
        with torch.no_grad():
            got = gm(*args, **kwargs)
    except Exception as exc:
        return f"its fx graph fails on the inputs it really gets ({_one_line(exc)})"
    if not _tensors_match(expected, got):
        return ("its fx graph computes something else than its forward on the example inputs (Python code that fx "
                "follows differently, e.g. isinstance on a tensor)")
    return None


def fresh_inputs(example_inputs: Sequence[Any]) -> list[Any]:
    """Copies of the example tensors for one run: a forward that works in place on its input must not change
    the caller's tensors, nor the inputs of the runs that follow."""
    return [pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, item) for item in example_inputs]


def _shapes(example_inputs: Sequence[torch.Tensor]) -> str:
    return ", ".join(str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in example_inputs)


def _one_line(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    first = first_line(exc, 200, "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def build_graph(model: nn.Module, example_inputs: Sequence[torch.Tensor] | None) -> OpGraph:
    """fx on the whole model, else torch.export, else fx per submodule; the graph says which one worked."""
    graph, fx_error = graph_fx(model, example_inputs)
    if graph is not None:
        return graph
    if example_inputs is None:
        return OpGraph(ops=[], tracer="none", untraced={
            "": f"torch.fx cannot trace it ({_one_line(fx_error)}) and without example inputs torch.export cannot run; "
                "pass example inputs (--input-shape)"})
    graph, export_error = graph_export(model, example_inputs)
    if graph is not None:
        return graph
    partial = graph_partial(model, example_inputs)
    for prefix, reason in partial.untraced.items():
        partial.untraced[prefix] = f"torch.fx: {reason}; torch.export of the whole model: {_one_line(export_error)}"
    return partial
