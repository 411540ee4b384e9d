"""The zoo exported to ONNX with its BatchNorms kept: every BatchNormalization listed once, folds proven, files valid."""
from __future__ import annotations


import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from bnstrip.testing.onnx_zoo import export_zoo


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ResNet18Style", "MobileNetV2Style", "ConvTransposeDecoder", "MLPBothSides",
                                  "ReusedConv", "BNBeforePaddedConv", "SubclassNet"])
def test_zoo_export_folds_with_every_bn_listed_once(name):
    from bnstrip.onnxfold.fold import fold_onnx
    from bnstrip.onnxfold.load import iter_graphs

    model = export_zoo(name)
    bns = [n for g in iter_graphs(model.graph) for n in g.node if n.op_type == "BatchNormalization"]
    result = fold_onnx(model)
    listed = [bn for _, bn in result.folded] + [bn for bn, _ in result.skipped]
    assert sorted(listed) == sorted(n.name for n in bns)
    left = [n.name for g in iter_graphs(result.model.graph) for n in g.node if n.op_type == "BatchNormalization"]
    assert sorted(left) == sorted(bn for bn, _ in result.skipped)
    assert result.check is not None and result.check.passed
    onnx.checker.check_model(result.model, full_check=True)
