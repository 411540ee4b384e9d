"""Branch merging on torch.export's graph (bnstrip/fold/reparam.py: exported_graph), for models torch.fx cannot
trace (ultralytics yolov10s). Ground truth: the unmerged model in float64, and the merges fx makes on the
same model without the untraceable loop."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bnstrip import fold_model
from bnstrip.errors import InputError
from bnstrip.fold.reparam import rebuild_merges
from bnstrip.fold.reparam_blocks import RepNet, ShapeLoopRepNet, randomize_bn
from bnstrip.testing.zoo_patterns import build
from conftest import ExportOnly

EXACT = 1e-12


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(a.abs().max()), 1.0)


def _net(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(cls(width=8)).double()


@pytest.mark.slow  # merges a RepNet twice (fx and export) and proves both: seconds
def test_a_model_fx_cannot_trace_merges_as_fx_would() -> None:
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    via_fx = fold_model(_net(RepNet), x, reparameterize=True)
    model = _net(ShapeLoopRepNet)
    via_export = fold_model(model, x, reparameterize=True)
    assert via_fx.tracer == "torch.fx" and via_export.tracer == "torch.export"
    assert [m.to_dict() for m in via_export.merged] == [m.to_dict() for m in via_fx.merged]
    assert len(via_export.merged) == 6 and via_export.skipped == []
    convs = sum(isinstance(m, nn.Conv2d) for m in via_export.model.modules())
    assert convs == sum(isinstance(m, nn.Conv2d) for m in via_fx.model.modules()) == 6
    fresh = torch.rand_like(x) * 4 - 2
    with torch.no_grad():
        for sample in (x, fresh):
            assert _rel(model(sample), via_export.model(sample)) <= EXACT




@pytest.mark.slow  # export, merge, fold again, each proven in float64: seconds
def test_the_batchnorm_after_a_merged_sum_folds_on_the_export_path_too() -> None:
    inner, (x,) = build("RepViTLike")
    model = ExportOnly(inner).eval()
    result = fold_model(model, x, reparameterize=True)
    assert result.tracer == "torch.export" and len(result.merged) == 2
    assert result.skipped == [] and {bn for _, bn in result.folded} >= {"inner.mixer.bn", "inner.mixer2.bn"}
    with torch.no_grad():
        assert _rel(model(x), result.model(x)) <= EXACT


def test_rebuilding_an_export_merge_without_inputs_says_how() -> None:
    model = _net(ShapeLoopRepNet)
    with pytest.raises(InputError, match="torch.export's graph"):
        rebuild_merges(model, [{"conv": "stem.rbr_dense.0", "branches": []}])
