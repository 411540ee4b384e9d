"""bnstrip.trace.reads: metadata-only reads and identities in eval, as the fold rules see them.

Predicates are checked on fx graphs of small modules; folds go through fold_model, with the
model as given (eval mode) as the ground truth.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bnstrip import fold_model
from bnstrip.trace.opgraph import ops_from_fx
from bnstrip.trace.reads import identity_in_eval, metadata_read, reading_users, value_users
from bnstrip.testing.zoo import randomize_bn


def _ops(module: nn.Module) -> dict[str, object]:
    gm = fx.symbolic_trace(module)
    return {op.name: op for op in ops_from_fx(gm)}


class Reads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop, self.drop_train = nn.Dropout(0.5).eval(), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n, size, count = x.shape[0], x.size(), x.dim()
        a = F.dropout(x, 0.1, training=False)
        b = torch.dropout(a, 0.1, False)
        c = F.dropout(b, 0.1)  # training defaults to True
        return self.drop_train(self.drop(c)).reshape(n, -1) + y.reshape_as(x).sum() + size[0] + count


def test_metadata_reads_and_shape_only_arguments_are_not_value_reads() -> None:
    ops = _ops(Reads())
    x, y = ops["x"], ops["y"]
    assert {op.name for op in x.users if metadata_read(op.node)} >= {"getattr_1", "size", "dim"}
    assert [op.name for op in value_users(x)] == ["dropout", "reshape_as"]
    assert [op.name for op in reading_users(x)] == ["dropout"]  # y.reshape_as(x) reads only x's shape
    assert [op.name for op in reading_users(y)] == ["reshape_as"]


def test_identities_in_eval() -> None:
    ops = _ops(Reads())
    verdicts = {name: identity_in_eval(ops[name]) for name in ("dropout", "dropout_1", "dropout_2", "drop",
                                                                "drop_train", "reshape_as")}
    assert verdicts == {"dropout": True, "dropout_1": True, "dropout_2": False, "drop": True,
                        "drop_train": False, "reshape_as": False}


class DropPath(nn.Module):
    """A stand-in for timm's DropPath (recognised by its qualified name): the identity in eval."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x * (torch.rand(x.shape[0], 1, 1, 1) > 0.1) / 0.9
        return x


DropPath.__module__ = "timm.layers.drop"


class HeadNet(nn.Module):
    """BatchNorm -> `mid` -> flatten -> Linear: only the structural rule can fold the BN (into fc)."""

    def __init__(self, mid: nn.Module) -> None:
        super().__init__()
        self.bn, self.mid, self.fc = nn.BatchNorm2d(4), mid, nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.mid(self.bn(x)), 1))


def _fold(model: nn.Module):
    torch.manual_seed(0)
    model = randomize_bn(model).eval()
    x = torch.randn(5, 4, 1, 1)
    result = fold_model(model, x)
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), rtol=1e-5, atol=1e-5)
    return result


def test_structural_rule_folds_through_droppath_in_eval() -> None:
    result = _fold(HeadNet(DropPath()))
    assert result.folded == [("fc", "bn")], result.skipped
    assert isinstance(result.model.mid, DropPath)


def test_hooked_dropout_is_not_an_identity() -> None:
    drop = nn.Dropout(0.5)
    drop.register_forward_hook(lambda module, args, out: out + 1.0)
    result = _fold(HeadNet(drop))
    assert result.folded == []
    assert "mid" in dict(result.skipped)["bn"]
