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
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from bnstrip.errors import InputError

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


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_backward_hooks", None)
                or getattr(module, "_forward_hooks_with_kwargs", None))


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
    if _has_hooks(module):
        return f"{cls.__name__} has hooks that may change its output"
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
    if _has_hooks(module):
        return f"{cls.__name__} has hooks that may change its output"
    if module.running_mean is None or module.running_var is None:
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


class BehaviourTracer(fx.Tracer):
    """fx tracer that keeps plain Conv/Linear/BatchNorm (subclasses too) as leaves, plus any opaque modules."""

    def __init__(self, opaque: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.opaque = opaque

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

    def propagate(self, example_inputs: Sequence[torch.Tensor]) -> None:
        self._shapes = _shapes(example_inputs)
        with torch.no_grad():
            self.run(*example_inputs)


def graph_fx(model: nn.Module, example_inputs: Sequence[torch.Tensor] | None) -> tuple[OpGraph | None, BaseException | None]:
    """Whole-model fx graph (output ranks from one run on the example inputs, if given), or the tracing error."""
    gm, _, error = fx_trace(model)
    if gm is None:
        return None, error
    if example_inputs is not None:
        _RankProp(gm, type(model).__name__).propagate(example_inputs)
    ops = ops_from_fx(gm)
    graph = OpGraph(ops=ops, tracer="torch.fx", calls=module_calls(ops), refusals=alias_refusals(model), gm=gm)
    graph.traced = {""}
    return graph, None


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
            program = torch.export.export(model, tuple(example_inputs), strict=False)
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
    _link_users(ops)
    graph = OpGraph(ops=ops, tracer="torch.export", calls=Counter(o.name for o in ops if o.module is not None),
                    refusals=alias_refusals(model))
    graph.traced = {""}
    return graph, None


# --------------------------------------------------------------------------- fx, submodule by submodule


def graph_partial(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> OpGraph:
    """fx graphs of every submodule fx can trace, with call counts checked against a real run.

    A module folded inside a traced submodule S must be called exactly once per call of S
    (counted with hooks on the example inputs): otherwise untraced code also calls it.
    """
    pieces: list[tuple[str, fx.GraphModule]] = []
    untraced: dict[str, str] = {}
    leaf_like = (_BatchNorm, _ConvNd, nn.Linear)

    def visit(module: nn.Module, prefix: str) -> None:
        """Trace `module`, making the submodule fx fails in opaque and retrying; else recurse into children."""
        opaque: set[int] = set()
        while True:
            gm, tracer, error = fx_trace(module, frozenset(opaque))
            if gm is not None:
                pieces.append((prefix, gm))
                for name, child in module.named_modules():
                    if id(child) in opaque:
                        visit(child, _join(prefix, name))
                return
            culprit = next(reversed(tracer.module_stack), None) if tracer.module_stack else None
            child = module.get_submodule(culprit) if culprit else None
            if child is None or child is module or id(child) in opaque:
                break
            opaque.add(id(child))
        untraced[prefix] = _one_line(error)
        for name, child in module.named_children():
            if not isinstance(child, leaf_like):
                visit(child, _join(prefix, name))

    visit(model, "")

    runtime_calls: Counter = Counter()
    ranks: dict[str, int] = {}
    handles = []
    names = {id(m): n for n, m in model.named_modules()}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        name = names[id(module)]
        runtime_calls[name] += 1
        if isinstance(module, _BatchNorm) and args and isinstance(args[0], torch.Tensor):
            ranks[name] = args[0].dim()

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as exc:
        raise InputError(f"example inputs of shape {_shapes(example_inputs)} do not run through {type(model).__name__}: "
                         f"{type(exc).__name__}: {_one_line(exc)}; pass the shape the model expects") from None
    finally:
        for handle in handles:
            handle.remove()

    ops: list[Op] = []
    calls: Counter = Counter()
    refusals = alias_refusals(model)
    for prefix, gm in pieces:
        piece_ops = ops_from_fx(gm, prefix, where=prefix)
        piece_calls = module_calls(piece_ops)
        for op in piece_ops:
            if op.kind == "bn" and op.functional is not None:
                op.note = op.note or f"it is a functional batch_norm inside {prefix}, and only fx on the whole model can remove those"
            if op.module is not None and isinstance(op.module, _BatchNorm):
                op.rank = ranks.get(op.name, op.rank)
        for name, count in piece_calls.items():
            calls[name] += count
            if count == 1 and runtime_calls[name] != runtime_calls[prefix]:
                refusals[name] = (f"it runs {runtime_calls[name]} times but {prefix} only {runtime_calls[prefix]} times, "
                                  "so code fx cannot trace also calls it")
        ops.extend(piece_ops)
    graph = OpGraph(ops=ops, tracer="torch.fx (per submodule)", calls=calls, refusals=refusals, untraced=untraced)
    graph.traced = {prefix for prefix, _ in pieces}
    return graph


def _shapes(example_inputs: Sequence[torch.Tensor]) -> str:
    return ", ".join(str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in example_inputs)


def _one_line(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    text = str(exc).strip().splitlines()
    first = text[0][:200] if text else ""
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
