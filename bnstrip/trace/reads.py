"""What a use of a value does with it: reads only its metadata, or passes it on unchanged in eval mode.

The one home for both questions, asked by the fold rules (bnstrip.fold.rules_adjacent), the channel
tracking (bnstrip.trace.channels) and the alias analysis (bnstrip.trace.alias): a shape read
(`x.size()`, `len(x)`, `y.reshape_as(x)` for x) does not consume values, so it never blocks a fold,
and an identity in eval (nn.Identity, Dropout, DropPath, F.dropout(training=False)) may be folded
through while it stays in the model. A new metadata read or identity-in-eval op goes here.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bnstrip._torch import OpOverload, has_module_hooks, op_schema
from bnstrip.trace.bn_registry import qualified_name

if TYPE_CHECKING:  # opgraph builds Ops; this module only reads them
    from bnstrip.trace.opgraph import Op

_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad", "is_sparse"}
_METADATA_METHODS = {"size", "dim", "numel", "nelement", "element_size", "is_floating_point", "is_complex",
                     "get_device", "is_contiguous", "ndimension"}
_METADATA_ATEN = {"sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "_assert_tensor_metadata"}
_SHAPE_ONLY_SECOND = {"reshape_as", "view_as", "expand_as", "type_as"}
"""Calls whose second argument gives only a shape (or dtype): `y.reshape_as(x)` reads no value of x."""

_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout)
_IDENTITY_IN_EVAL_NAMES = {"timm.layers.drop.DropPath", "torchvision.ops.stochastic_depth.StochasticDepth"}
_DROPOUT_CALLS = {"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d",
                 "dropout3d"}
"""Names of the functional dropouts (F.*, torch.* and their aten overloads): identities when not training."""


def call_name(node: fx.Node | None) -> str:
    """'flatten', 'mean', 'cat', ... for fx call_method/call_function and torch.export's aten overloads."""
    if node is None:
        return ""
    target = node.target
    if isinstance(target, str):
        return target
    schema = op_schema(target)
    if schema is not None:
        return schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def metadata_read(node: fx.Node | None) -> bool:
    """A use of a tensor that reads its shape/dtype/device only (x.ndim, x.size(), len(x); aten.sym_size in
    torch.export graphs), which folding does not change: it is not a consumer of the values."""
    if node is None:
        return False
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in _METADATA_ATTRIBUTES
    if node.op == "call_function" and node.target is len:
        return True
    if node.op == "call_function" and isinstance(node.target, OpOverload):
        return op_schema(node.target).name.split("::")[-1] in _METADATA_ATEN
    return node.op == "call_method" and node.target in _METADATA_METHODS


def value_users(op: Op) -> list[Op]:
    """The users of `op` that read its values (metadata reads left out)."""
    return [user for user in op.users if not metadata_read(user.node)]


def reading_users(op: Op) -> list[Op]:
    """Users that read `op`'s values: not metadata reads, nor `y.reshape_as(x)` reading only x's shape."""
    found = []
    for user in value_users(op):
        node = user.node
        if (node is not None and call_name(node) in _SHAPE_ONLY_SECOND and len(node.args) > 1
                and node.args[1] is op.node and node.args[0] is not op.node):
            continue
        found.append(user)
    return found


def _dropout_off(node: fx.Node) -> bool:
    """A functional dropout that does nothing: training=False (F.dropout defaults to True; aten names it train)."""
    if isinstance(node.target, str) or op_schema(node.target) is None:
        fn = getattr(F, call_name(node), None)
        if fn is None:
            return False
        try:
            bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
        except TypeError:
            return False
        bound.apply_defaults()
        return bound.arguments.get("training") is False
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return train is False


def identity_in_eval(op: Op) -> bool:
    """An op that returns its input's values unchanged in eval mode (nn.Identity, dropout and DropPath in eval,
    F.dropout(training=False), aten.dropout(train=False)): a fold may go through it, the op stays."""
    node = op.node
    if node is None or len(op.inputs) != 1:
        return False
    if node.op == "call_module":
        module = op.module
        if module is None or has_module_hooks(module):
            return False
        if type(module) is nn.Identity:
            return True
        cls = type(module)
        known = isinstance(module, _IDENTITY_MODULES) and cls.forward in {c.forward for c in _IDENTITY_MODULES}
        return (known or qualified_name(cls) in _IDENTITY_IN_EVAL_NAMES) and not module.training
    if node.op not in ("call_function", "call_method"):
        return False
    return call_name(node) in _DROPOUT_CALLS and _dropout_off(node)
