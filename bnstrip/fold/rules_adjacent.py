"""Fold matchers for a BatchNorm next to its layer, and the checks every matcher shares.

`try_producer` folds a BatchNorm into the Conv/Linear whose output it alone reads, `try_consumer`
into the layer that alone reads its output; both look through ops that are identities in eval
(Dropout, nn.Identity). The structural matchers (bnstrip.fold.rules_structural) reuse the layer
checks here; bnstrip.fold.rules lists all matchers in its table PATTERNS.
"""
from __future__ import annotations

from typing import cast

import torch
from torch import nn

from bnstrip._torch import ConvNd, ConvTransposeNd
from bnstrip.core.foldmath import BNStats
from bnstrip.fold.proof import own_forward_issue
from bnstrip.fold.proof_consumer import own_forward_consumer_issue
from bnstrip.trace.alias import other_readers, writer_of
from bnstrip.trace.bn_registry import batchnorm_entry, module_stats
from bnstrip.trace.channels import shape_of
from bnstrip.trace.classify import bn_fixed_rank, has_hooks
from bnstrip.trace.opgraph import Op, OpGraph
from bnstrip.trace.reads import identity_in_eval, value_users

Match = Op | list | str | None
"""What a matcher returns: the absorbing layer, [(layer, start, stop)] for a concatenation, why not, or None
when the pattern does not apply at all (it then adds nothing to the reasons)."""


def bn_channels(bn: Op, root: nn.Module) -> int:
    if bn.module is not None:
        return int(module_stats(bn.module).running_mean.numel())
    assert bn.functional is not None  # a BatchNorm op is a functional call or a module's
    return int(tensor_at(root, bn.functional.mean).numel())


def layer_module(layer: Op) -> ConvNd | nn.Linear:
    """The module of a 'layer' op: a conv or a Linear (bnstrip.trace.classify sorts layers by isinstance)."""
    return cast("ConvNd | nn.Linear", layer.module)


def input_channels(consumer: Op, axis: int, rank: int) -> int | str:
    """The channels a layer reads along `axis` of its `rank`-D input, or why that axis is not its channel axis
    (a Linear mixes the last dim; a conv's channel dim is 1 of an input of its weight's rank)."""
    module = layer_module(consumer)
    if isinstance(module, nn.Linear):
        if axis != rank - 1:
            return f"its channels reach dim {axis} of the input of Linear {consumer.name}, which mixes the last dim"
        return module.in_features
    if axis != 1 or rank != module.weight.dim():
        return f"its channels reach dim {axis} of a {rank}-D input of {consumer.name}, not its channel dim"
    return module.in_channels


def out_channels(module: nn.Module) -> int:
    """Output channels of a conv or Linear (the module of a 'layer' op, or a layer fold.load found by name)."""
    return module.out_features if isinstance(module, nn.Linear) else cast(ConvNd, module).out_channels


def bn_rank(bn: Op) -> int | None:
    return bn.rank if bn.rank is not None else bn_fixed_rank(bn.module)


def layer_issue(layer: Op, graph: OpGraph, role: str, calls_ok: int = 1) -> str | None:
    """Why `layer` cannot absorb a BatchNorm whatever its shapes; `calls_ok`: calls allowed (a pair called together)."""
    calls = graph.calls.get(layer.name, 1)
    if calls > calls_ok:
        return f"{role} {layer.name} is called {calls} times, so folding would change every call"
    if layer.name in graph.refusals:
        return f"{role} {layer.name}: {graph.refusals[layer.name]}"
    return None


def _through_identities_back(op: Op, user: Op) -> tuple[Op, Op]:
    """(the op before a chain of identity-in-eval ops that only `user` reads, the chain's first op or `user`)."""
    while identity_in_eval(op) and value_users(op) == [user]:
        op, user = op.inputs[0], op
    return op, user


def _through_identities_forward(op: Op) -> tuple[list[Op], Op | None]:
    """(value users of `op`, or those of the last of a chain of identity-in-eval ops it alone feeds; that last op)."""
    last = None
    users = value_users(op)
    while len(users) == 1 and identity_in_eval(users[0]) and users[0].inputs == [op if last is None else last]:
        last = users[0]
        users = value_users(last)
    return users, last



def try_producer(bn: Op, graph: OpGraph, root: nn.Module, calls_ok: int = 1) -> Op | str:
    if not bn.inputs:
        return "its input is not in the traced graph"
    producer, reader = _through_identities_back(bn.inputs[0], bn)
    if producer.own_forward is not None and not graph.example_run:
        return (f"its input comes from {producer.label}, which {producer.own_forward.split(', so ')[0]}; folding "
                "into it needs a real run to prove it: pass example inputs (example_inputs)")
    if producer.kind != "layer":
        if producer.note:
            return f"its input comes from {producer.label}, which cannot absorb it ({producer.note})"
        return f"its input comes from {producer.label}, not directly from a Conv, ConvTranspose or Linear"
    if issue := layer_issue(producer, graph, "its producer", calls_ok):
        return issue
    others = [u for u in value_users(producer) if u is not reader]
    if others:
        return f"the output of {producer.name} also feeds {others[0].label}, which must keep the unnormalised values"
    module = layer_module(producer)
    rank = bn_rank(bn)
    if isinstance(module, nn.Linear):
        if rank is None:
            return (f"its input rank is unknown, and BatchNorm1d after Linear {producer.name} is exact only on 2-D "
                    "input; pass example inputs (example_inputs)")
        if rank != 2:
            return (f"it normalises dim 1 of the {rank}-D output of Linear {producer.name}, whose features are the "
                    "last dim, so folding would scale the wrong axis")
    else:
        if rank is None:
            return (f"its input rank is unknown (an unbatched {type(module).__name__} output would put channels on "
                    "dim 0); pass example inputs (example_inputs)")
        if rank != module.weight.dim():
            return (f"it normalises dim 1 of a {rank}-D tensor, which is not the channel dim of "
                    f"{producer.name}'s output (unbatched call?)")
    if out_channels(module) != bn_channels(bn, root):
        return f"{producer.name} produces {out_channels(module)} channels but it has {bn_channels(bn, root)}"
    # Conv2dSame-like: prove that scaling its channels scales its output
    if producer.own_forward is not None and (issue := own_forward_proof(producer, bn, graph, bn_stats(bn, root, None))):
        return f"its input comes from {producer.label}: {issue}"
    return producer


def own_forward_consumer_proof(consumer: Op, bn: Op, graph: OpGraph, root: nn.Module, source: Op,
                               axis: int) -> str | None:
    """Why a layer with its own forward (timm's Linear) cannot absorb `bn` arriving on dim `axis` of its input
    (the output of `source`), proven once per pair on a real-run shape."""
    if not graph.example_run:
        return (f"{cast(str, consumer.own_forward).split(', so ')[0]}; folding into it needs a real run to prove it: pass "
                "example inputs (example_inputs)")
    key = (consumer.name, bn.name)
    if key not in graph.proofs:
        shape = shape_of(source)
        shape = (1, *shape[1:]) if shape and axis != 0 else shape
        graph.proofs[key] = own_forward_consumer_issue(layer_module(consumer), shape, axis, bn_stats(bn, root, None),
                                                       f"{bn.name} + {consumer.name}")
    return graph.proofs[key]


def own_forward_proof(producer: Op, bn: Op, graph: OpGraph, stats: BNStats) -> str | None:
    """Why folding `stats` into a layer with its own forward (Conv2dSame) is not exact, proven once per pair."""
    if not graph.example_run:
        return (f"{cast(str, producer.own_forward).split(', so ')[0]}; folding into it needs a real run to prove it: pass "
                "example inputs (example_inputs)")
    key = (producer.name, bn.name)  # plan_folds asks again on every pass: prove once
    if key not in graph.proofs:
        shape = shape_of(producer.inputs[0]) if producer.inputs else None
        shape = (1, *shape[1:]) if shape else shape  # one sample is enough for a per-channel map
        graph.proofs[key] = own_forward_issue(layer_module(producer), shape, stats, f"{producer.name} + {bn.name}")
    return graph.proofs[key]


def _zero_padded(conv: ConvNd) -> bool:
    """True when the conv reads zeros outside its input (where a BN shift would not be applied)."""
    if conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return False
        return any(d * (k - 1) > 0 for d, k in zip(conv.dilation, conv.kernel_size, strict=True))
    return any(p != 0 for p in conv.padding)


def tail_issue(bn: Op) -> str | None:
    """Why `bn` can never fold into what follows it: a registered look-alike that applies more after normalising
    (an activation, dropout) sits between its normalisation and every later layer."""
    if bn.module is not None and (entry := batchnorm_entry(bn.module)) is not None and entry.post is not None:
        tail = entry.post(bn.module)
        if all(type(m) is nn.Identity and not has_hooks(m) for m in tail.children()):
            return None  # BatchNormAct2d(act=Identity, drop=Identity): only the normalisation is left
        return f"{type(bn.module).__name__} applies more after normalising, so it cannot move into a later layer"
    return None


def try_consumer(bn: Op, graph: OpGraph, root: nn.Module, keep_structure: bool) -> Op | str:
    users, last = _through_identities_forward(bn)
    if not users:
        return "its output is unused"
    if len(users) > 1:
        return f"its output feeds {len(users)} ops ({', '.join(u.label for u in users[:3])})"
    consumer = users[0]
    if consumer.own_forward is not None and (issue := own_forward_consumer_proof(
            consumer, bn, graph, root, bn if last is None else last, 1 if bn_rank(bn) != 1 else 0)):
        return f"its output goes to {consumer.label}, which cannot absorb it ({issue})"
    if consumer.kind != "layer":
        if consumer.note:
            return f"its output goes to {consumer.label}, which cannot absorb it ({consumer.note})"
        return f"its output goes to {consumer.label}, not directly to a Linear or Conv"
    module = layer_module(consumer)
    if consumer.module is not None and isinstance(module, ConvTransposeNd):
        return (f"it feeds ConvTranspose {consumer.name}, where border outputs sum fewer taps of the BatchNorm's "
                "shift, so folding into it is not exact")
    if issue := layer_issue(consumer, graph, "the next layer"):
        return issue
    if consumer.inputs != [bn if last is None else last]:
        return f"the next layer {consumer.name} takes other inputs too"
    if not keep_structure and (issue := aliasing_issue(bn, consumer, graph)):
        return issue
    rank = bn_rank(bn)
    if isinstance(module, nn.Linear):
        if rank is None:
            return f"its input rank is unknown, and folding into Linear {consumer.name} is exact only on 2-D input; pass example inputs (example_inputs)"
        if rank != 2:
            return (f"it normalises dim 1 of a {rank}-D tensor but Linear {consumer.name} mixes the last dim, "
                    "so it cannot absorb it")
        in_channels = module.in_features
    else:
        if rank is None or rank != module.weight.dim():
            return f"its input rank is {'unknown' if rank is None else rank}, not the batched rank {module.weight.dim()} of {consumer.name}"
        in_channels = module.in_channels
    return consumer_fits(bn, consumer, in_channels, root, keep_structure)


def consumer_fits(bn: Op, consumer: Op, in_channels: int, root: nn.Module, keep_structure: bool) -> Op | str:
    """The checks on the layer after a BatchNorm once its channels are known to land on the layer's inputs."""
    module = layer_module(consumer)
    if not isinstance(module, nn.Linear) and _zero_padded(module):
        return (f"the next conv {consumer.name} zero-pads (padding={module.padding}) and padded zeros never get "
                "the BatchNorm's shift, so folding into it is not exact")
    if in_channels != bn_channels(bn, root):
        return f"{consumer.name} takes {in_channels} channels but it has {bn_channels(bn, root)}"
    if keep_structure and module.bias is None:
        return f"keep_structure=True: the next layer {consumer.name} has no bias to hold the folded shift"
    return consumer


def aliasing_issue(bn: Op, consumer: Op, graph: OpGraph) -> str | None:
    """Why dropping the BatchNorm would let an in-place write reach `consumer`, or None.

    Without the BatchNorm its output is its input tensor itself, so a write into that input
    (or a view of it) between the two calls would now reach the consumer. Only forms that delete
    the BatchNorm are affected; keep_structure=True keeps it as a real op.
    """
    source = bn.inputs[0] if bn.inputs else None
    if source is None:
        return None
    changed = f"without the BatchNorm, {consumer.name} would read that same tensor, changed"
    if (writer := writer_of(source, skip=bn)) is not None:
        return f"its input is also changed in place by {writer.label}; {changed}"
    if bn.name in graph.input_written:
        return f"its input is changed in place ({graph.input_written[bn.name]}) after it runs; {changed}"
    if not graph.sees_inplace and (readers := other_readers(source, skip=bn)):
        return (f"its input is also used by {readers[0].label}, and torch.fx records `x += y` as out-of-place, so "
                "an in-place change cannot be ruled out without example inputs; pass example inputs (example_inputs)")
    return None


def tensor_at(root: nn.Module, path: str) -> torch.Tensor:
    """The parameter or buffer at a dotted path (a functional batch_norm's statistics can be either)."""
    try:
        return root.get_buffer(path)
    except AttributeError:
        return root.get_parameter(path)


def bn_stats(bn: Op, root: nn.Module, eps: float | None) -> BNStats:
    if bn.functional is not None:
        spec = bn.functional
        return BNStats(tensor_at(root, spec.mean), tensor_at(root, spec.var),
                       tensor_at(root, spec.weight) if spec.weight else None,
                       tensor_at(root, spec.bias) if spec.bias else None, spec.eps)
    assert bn.module is not None  # a BatchNorm op is a functional call or a module's
    return module_stats(bn.module, eps)
