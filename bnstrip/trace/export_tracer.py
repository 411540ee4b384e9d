"""torch.export on example inputs, for models fx cannot trace (Python control flow on shapes).

The aten graph is mapped back to module names through the graph signature; a call counts
as a module's only when it runs inside that module with that module's own tensors.
"""
from __future__ import annotations

import operator
import re
from typing import Any, Sequence, cast

import torch
import torch.fx as fx
from torch import nn
from bnstrip._torch import BatchNormBase as _BatchNorm
from bnstrip._torch import ConvNd
from bnstrip._torch import graph_codegen

from bnstrip.core.compare import fresh_inputs
from bnstrip.core.torch_env import quiet_torch_logs
from bnstrip.trace.alias import module_refusals
from bnstrip.trace.bn_registry import PLAIN, batchnorm_entry
from bnstrip.trace.classify import bn_refusal, layer_kind, layer_refusal, own_forward_note
from bnstrip.trace.opgraph import Op, OpGraph, call_label, link_users, module_calls, shape_rank

_A = torch.ops.aten
_EXPORT_CONV = {_A.conv1d.default, _A.conv2d.default, _A.conv3d.default, _A.conv1d.padding, _A.conv2d.padding,
                _A.conv3d.padding}
_EXPORT_CONVT = {_A.conv_transpose1d.default, _A.conv_transpose2d.input, _A.conv_transpose3d.input}
_EXPORT_LINEAR = {_A.linear.default}
_EXPORT_BN = {_A.batch_norm.default}
_EXPORT_BN_TUPLE = {_A._native_batch_norm_legit_no_training.default}


_SLICE = re.compile(r"slice\((-?\d+|None),\s*(-?\d+|None),\s*(-?\d+|None)\)")


def real_module_path(path: str, root: nn.Module) -> str:
    """The module path under `root` for a path torch.export may name through calls: a slice of a container called
    in forward (ultralytics RT-DETR's `model.slice(None, -1, None).0.stem1.bn` is `model.0.stem1.bn`).
    Unchanged when it names no module that way."""
    parts, real, module, index = path.split(".") if path else [], [], root, 0
    while index < len(parts):
        segment = parts[index]
        found = _SLICE.fullmatch(segment)
        if found is not None and index + 1 < len(parts) and parts[index + 1].lstrip("-").isdigit():
            bounds = slice(*(None if g == "None" else int(g) for g in found.groups()))
            try:
                segment = list(module._modules)[bounds][int(parts[index + 1])]
            except (IndexError, ValueError):
                return path
            index += 1
        child = module._modules.get(segment)
        if child is None:
            return path
        real.append(segment)
        module, index = child, index + 1
    return ".".join(real)


def _real_module_stacks(graph: fx.Graph, root: nn.Module) -> None:
    """Rewrite call-like segments of each node's nn_module_stack paths into real module paths (in place)."""
    known = {name for name, _ in root.named_modules()}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack or all(path in known for path, _ in stack.values()):
            continue
        node.meta["nn_module_stack"] = {key: (real_module_path(path, root), cls) for key, (path, cls) in stack.items()}


def _innermost_module(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path


class _ExportNames:
    """Maps torch.export's aten calls back to module names through the graph signature."""

    def __init__(self, model: nn.Module, program: Any) -> None:
        signature = program.graph_signature
        self.fqn_of = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
        self.modules = dict(model.named_modules())

    def param_module(self, arg: Any, suffix: str) -> str | None:
        if not isinstance(arg, fx.Node) or arg.op != "placeholder" or arg.name not in self.fqn_of:
            return None
        fqn = self.fqn_of[arg.name]
        return fqn[: -len(suffix) - 1] if fqn.endswith("." + suffix) else None

    @staticmethod
    def sole_user(arg: Any, node: fx.Node) -> bool:
        """Only calls like `node` inside the same module use `arg` (a module called several times is counted)."""
        return not isinstance(arg, fx.Node) or all(
            user.target == node.target and _innermost_module(user) == _innermost_module(node) for user in arg.users)

    def layer_op(self, node: fx.Node) -> Op:
        """A conv/convT/linear call: the module's own forward with its own parameters, or 'other' with why not."""
        name = self.param_module(node.args[1], "weight")
        module = self.modules.get(name) if name is not None else None
        family = "conv" if node.target in _EXPORT_CONV else "convT" if node.target in _EXPORT_CONVT else "linear"
        bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        note = None
        if module is None:
            note = "its weight is not a module parameter"
        elif layer_kind(module) != family or _innermost_module(node) != name:
            note = f"it is not the forward of {name}"
        elif (note := layer_refusal(module, own_forward=True)) is None:
            if not self.sole_user(node.args[1], node) or not self.sole_user(bias_arg, node):
                note = f"the parameters of {name} are also used elsewhere"
            elif (bias_arg is None) != (module.bias is None) or (
                    bias_arg is not None and self.param_module(bias_arg, "bias") != name):
                note = f"{name} is called with a bias that is not its own"
        label = f"{name} ({type(module).__name__})" if module is not None else f"{node.target}"
        return Op(name=name if name is not None and module is not None else node.name, kind="other" if note else "layer", label=label,
                  module=module, note=note, own_forward=None if note or module is None else own_forward_note(module))

    def bn_op(self, node: fx.Node) -> Op:
        """A batch_norm call: a BatchNorm module's own eval-mode forward, or a 'bn' op whose note says why not."""
        tuple_form = node.target in _EXPORT_BN_TUPLE
        mean_arg, var_arg = node.args[3], node.args[4]
        training = False if tuple_form else node.args[5]
        name = self.param_module(mean_arg, "running_mean")
        module = self.modules.get(name) if name is not None else None
        note = None
        if module is None or not isinstance(module, _BatchNorm):
            note = ("its statistics are not those of a BatchNorm module (a functional batch_norm that only "
                    "torch.export could trace)")
        elif _innermost_module(node) != name:
            note = f"it is not the forward of {name}"
        elif (note := bn_refusal(module)) is None:
            if training:
                note = "it runs with training=True"
            elif not all(self.sole_user(a, node) for a in (node.args[1], node.args[2], mean_arg, var_arg)):
                note = f"the tensors of {name} are also used elsewhere"
            elif tuple_form and any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
                note = "its saved statistics are used"
        label = f"{name} ({type(module).__name__})" if module is not None else str(node.target)
        return Op(name=name if name is not None and module is not None else node.name, kind="bn", label=label, module=module, note=note)


def graph_export(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> tuple[OpGraph | None, BaseException | None]:
    """Graph from torch.export (aten ops), mapped back to module names through the graph signature."""
    try:
        with quiet_torch_logs(), torch.no_grad():
            program = torch.export.export(model, tuple(fresh_inputs(example_inputs)), strict=False)
    except Exception as exc:
        return None, exc
    _real_module_stacks(program.graph, model)
    names = _ExportNames(model, program)
    ops: list[Op] = []
    by_node: dict[fx.Node, Op] = {}
    groups = _batchnorm_like_groups(program.graph, names)
    for node in program.graph.nodes:
        if node in groups:
            if (group := groups[node]) is not None:  # the output of a registered BatchNorm look-alike: one op
                op, data = group
                op.node, op.rank, op.inputs = node, shape_rank(node), [by_node[data]]
                by_node[node] = op
                ops.append(op)
            continue
        if node.op == "placeholder":
            fqn = names.fqn_of.get(node.name)
            op = Op(name=fqn, kind="other", label=f"parameter {fqn}") if fqn is not None \
                else Op(name=node.name, kind="other", label="the input of the model")
        elif node.op == "output":
            op = Op(name="output", kind="other", label="the output of the model")
        elif node.op == "call_function" and node.target is operator.getitem and node.args[0] in by_node \
                and by_node[node.args[0]].kind == "bn" and node.args[1] == 0:
            by_node[node] = by_node[node.args[0]]
            by_node[node].node = node
            by_node[node].rank = shape_rank(node)
            continue
        elif node.op == "call_function" and node.target in _EXPORT_CONV | _EXPORT_CONVT | _EXPORT_LINEAR:
            op = names.layer_op(node)
        elif node.op == "call_function" and node.target in _EXPORT_BN | _EXPORT_BN_TUPLE:
            op = names.bn_op(node)
        else:
            op = Op(name=node.name, kind="other", label=call_label(node, ""))
        op.node = node
        op.rank = shape_rank(node)
        op.inputs = [by_node[n] for n in ([node.args[0]] if op.kind in ("layer", "bn") else node.all_input_nodes)
                     if isinstance(n, fx.Node)]
        by_node[node] = op
        ops.append(op)
    _absorb_conv_padding(ops)
    link_users(ops)
    graph = OpGraph(ops=ops, tracer="torch.export", calls=module_calls(ops), refusals=module_refusals(model),
                    example_run=True)
    graph.traced = {""}
    return graph, None


def _batchnorm_like_groups(graph: fx.Graph, names: _ExportNames) -> dict[fx.Node, tuple[Op, fx.Node] | None]:
    """The aten ops of each registered BatchNorm look-alike (FrozenBatchNorm2d, BatchNormAct2d: a whole module
    call, as fx keeps it): its output node -> one 'bn' op, its other nodes -> None.

    torch.export has no leaf modules, so a look-alike's forward arrives as loose ops; they are one op when they
    read one outside tensor besides the module's own tensors (used by nothing else) and one of them is the
    only value used outside. Otherwise they stay loose ops, and the module is reported as not seen.
    """
    members: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        path = next((p for p, _ in stack.values() if batchnorm_entry(names.modules.get(p)) not in (None, PLAIN)), None)
        if path is not None and node.op == "call_function":
            members.setdefault(path, []).append(node)
    groups: dict[fx.Node, tuple[Op, fx.Node] | None] = {}
    for path, nodes in members.items():
        inside = set(nodes)
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        outside = {i for n in nodes for i in n.all_input_nodes if i not in inside}
        own = {i for i in outside if (names.fqn_of.get(i.name) or "").rpartition(".")[0] == path}
        data = outside - own
        if len(outputs) != 1 or len(data) != 1 or any(set(i.users) - inside for i in own):
            continue
        module = names.modules[path]
        op = Op(name=path, kind="bn", label=f"{path} ({type(module).__name__})", module=module,
                note=bn_refusal(module))
        groups.update({n: None for n in nodes})
        groups[outputs[0]] = (op, next(iter(data)))
    return groups


def _absorb_conv_padding(ops: Sequence[Op]) -> None:
    """Treat the F.pad that a reflect/replicate/circular Conv runs in its own forward as part of the conv.

    torch.export records that padding as a separate op inside the conv's module; without this a
    BatchNorm before such a conv would look like it feeds a pad, not the conv (fx keeps the conv whole).
    """
    for op in ops:
        module = op.module
        if op.kind != "layer" or module is None or layer_kind(module) != "conv" or cast(ConvNd, module).padding_mode == "zeros" \
                or not op.inputs:
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


_GUARDS_MODULE = "_guards_fn"
"""The submodule torch.export puts in ep.module() to check its input guards."""


def plain_graph_module(unlifted: fx.GraphModule) -> tuple[fx.GraphModule, Any]:
    """ep.module() as a plain GraphModule over the flat input leaves (no pytree code, no input guards)."""
    codegen = graph_codegen(unlifted.graph)
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(unlifted.graph, values)
    graph.output(out)
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target) == _GUARDS_MODULE:
            graph.erase_node(node)
    gm = fx.GraphModule(unlifted, graph, "ExportedProgram")
    return gm, codegen
