"""torch.fx on the whole model: the complete graph, and the only one that can delete functional F.batch_norm calls.

With example inputs the graph is checked against one real run (observe_run): a graph whose
outputs differ from the forward's is not used.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from bnstrip.core.compare import fresh_inputs, outputs_match, same_arguments
from bnstrip.errors import InputError
from bnstrip.trace.alias import attribute_read_refusals, module_refusals
from bnstrip.trace.bn_registry import is_batchnorm_like
from bnstrip.trace.classify import bn_refusal, foldable_module_names, layer_kind, layer_refusal, own_forward_note
from bnstrip.trace.observe import Remembered, observe_run, runtime_refusals
from bnstrip.trace.opgraph import OpGraph, error_summary, module_calls, ops_from_fx, shapes_text

class BehaviourTracer(fx.Tracer):
    """fx tracer that keeps plain Conv/Linear/BatchNorm (subclasses too) as leaves, plus any opaque modules."""

    def __init__(self, opaque: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.opaque = opaque
        # Buffers read as attributes become get_attr nodes instead of constants baked in at trace time,
        # so code that reads a BatchNorm's running_var outside its call shows up in the graph.
        self.proxy_buffer_attributes = True

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        # Decided before tracing: while fx traces, module attribute reads return proxies, so a check that
        # compares a BatchNorm's statistics with its own buffers would fail inside is_leaf_module.
        self.leaves = {id(m) for m in root.modules() if _keep_whole(m)} if isinstance(root, nn.Module) else set()
        return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.opaque or id(m) in getattr(self, "leaves", ()):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _keep_whole(m: nn.Module) -> bool:
    """Modules fx must not trace into: plain layers, Conv2dSame-like layers (only ever a real-run-checked
    producer), and BatchNorms bnstrip knows (registered look-alikes too; training mode is a reason, not a trace)."""
    if layer_kind(m) is not None and (layer_refusal(m) is None or own_forward_note(m) is not None):
        return True
    return is_batchnorm_like(m) and bn_refusal(m, ignore_training=True) is None


def fx_trace(model: nn.Module, opaque: frozenset[int] = frozenset()) -> tuple[fx.GraphModule | None, BehaviourTracer, BaseException | None]:
    """(GraphModule, tracer, None) or (None, tracer, error); the tracer's module_stack says where it failed."""
    tracer = BehaviourTracer(opaque)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, ... from user code
        return None, tracer, exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__), tracer, None


class _RankProp(fx.Interpreter):
    """Run the graph once on the example inputs, recording each node's output rank and shape in node.meta.

    A conv or Linear that the real run saw called with the very same arguments (observe_run's
    `results`, by call order) gives the output it gave there instead of computing it again: the
    same module on the same arguments, so the graph's outputs are what computing would give.
    """

    def __init__(self, gm: fx.GraphModule, model_name: str,
                 remembered: dict[str, list[Remembered | None]] | None = None) -> None:
        super().__init__(gm)
        self.model_name = model_name
        self.remembered = remembered or {}
        self.seen: Counter = Counter()
        self.used: list[Remembered] = []

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        calls = self.remembered.get(target)
        if calls is not None:
            index = self.seen[target]
            self.seen[target] += 1
            call = calls[index] if index < len(calls) else None
            kept = call.get() if call is not None else None
            if call is not None and kept is not None and same_arguments(kept[0], (tuple(args), dict(kwargs))):
                self.used.append(call)
                return kept[1]
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise InputError(f"example inputs of shape {self._shapes} do not run through {self.model_name} "
                             f"(at {n.name}: {error_summary(exc)}); pass the shape the model expects") from None
        if isinstance(result, torch.Tensor):
            n.meta["val_rank"] = result.dim()
            n.meta["val_shape"] = tuple(result.shape)  # bnstrip.trace.channels follows channels through reshapes
        return result

    def changed_the_run(self) -> bool:
        """Whether the graph wrote in place into a tensor of the real run it was given (the run's own output may
        be one): then neither run's outputs can be trusted, and both are made again without sharing."""
        return any(call.get() is None for call in self.used)

    def propagate(self, example_inputs: Sequence[torch.Tensor]) -> Any:
        self._shapes = shapes_text(example_inputs)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)  # the same seed as observe_run, so random ops agree
            return self.run(*fresh_inputs(example_inputs))


REMEMBER_FROM = 256
"""Multiply-adds per output element from which a conv or Linear is remembered from the real run rather than computed
again in the graph's run: below it (depthwise, thin 1x1), keeping its output alive costs about what computing it does."""


def _worth_remembering(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (layer_kind(module) is not None and isinstance(weight, torch.Tensor) and weight.dim() >= 2
            and weight.numel() >= REMEMBER_FROM * weight.shape[0])


class UnfaithfulTrace(Exception):
    """fx's graph computes something else than the model's forward (e.g. isinstance(x, torch.Tensor) is False for
    fx's proxies, so a traced branch differs from the one that really runs)."""


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
        layers = frozenset(str(n.target) for n in gm.graph.nodes
                           if n.op == "call_module" and _worth_remembering(gm.get_submodule(str(n.target))))
        for remember in (layers, frozenset()):  # the second time only if the graph wrote into the run's tensors
            record = observe_run(model, example_inputs, foldable_module_names(model), capture={""}, remember=remember)
            args, kwargs, forward_output = record.captured.get("", (tuple(example_inputs), {}, record.output))
            if kwargs:
                return None, UnfaithfulTrace("a forward pre-hook passes keyword arguments to the model's forward")
            propagation = _RankProp(gm, type(model).__name__, record.results)
            traced_output = propagation.propagate(args)
            record.results.clear()  # the run's tensors are needed for this one propagation only
            if not propagation.changed_the_run():
                break
        if not outputs_match(forward_output, traced_output):
            return None, UnfaithfulTrace("the traced graph's outputs differ from the model's own on the example "
                                         "inputs (Python code that fx follows differently, e.g. isinstance on a tensor)")
    ops = ops_from_fx(gm, root=model)
    calls = module_calls(ops)
    refusals = module_refusals(model)
    for name, reason in attribute_read_refusals(ops, gm).items():
        refusals.setdefault(name, reason)
    if record is not None:
        for name, reason in runtime_refusals(ops, record, calls).items():
            refusals.setdefault(name, reason)
    graph = OpGraph(ops=ops, tracer="torch.fx", calls=calls, refusals=refusals, gm=gm,
                    model_output=None if record is None else record.output,
                    input_written={} if record is None else record.input_written, sees_inplace=record is not None,
                    example_run=record is not None)
    graph.traced = {""}
    return graph, None
