"""fold_onnx on tiny hand-built graphs: every pattern exact against independent evaluations, every refusal named.

Ground truth is the *unfolded* graph run by onnxruntime and by onnx's own reference evaluator
(neither goes through bnstrip's fold code), plus float64 arithmetic written out in the test.
"""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import helper, numpy_helper

from bnstrip.onnxfold import samples
from bnstrip.onnxfold.fold import fold_onnx

BUGGY_IN_ONNX_REFERENCE = {"convtranspose_g2_bn", "opset9"}
"""onnx 1.23's reference evaluator gets these wrong itself (grouped ConvTranspose reshape, BN-9 momentum)."""


def run(model, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def feeds_for(model, seed=3):
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    return {v.name: rng.normal(0, 1, [d.dim_value for d in v.type.tensor_type.shape.dim]).astype(np.float32)
            for v in model.graph.input if v.name not in inits}


def bn_count(model):
    from bnstrip.onnxfold.load import iter_graphs

    return sum(n.op_type == "BatchNormalization" for g in iter_graphs(model.graph) for n in g.node)


@pytest.mark.parametrize("name", sorted(samples.SAMPLES))
def test_every_pattern_folds_exactly(name):
    original = samples.SAMPLES[name]()
    result = fold_onnx(original)
    folded = result.model
    assert bn_count(folded) == 0 and not result.skipped and result.folded
    assert result.check is not None and result.check.passed
    onnx.checker.check_model(folded, full_check=True)
    assert [v.name for v in folded.graph.input] == [v.name for v in original.graph.input]
    assert [v.name for v in folded.graph.output] == [v.name for v in original.graph.output]
    assert list(folded.opset_import) == list(original.opset_import)
    feeds = feeds_for(original)
    want, got = run(original, feeds)[0], run(folded, feeds)[0]
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= 1e-5 * scale
    if name not in BUGGY_IN_ONNX_REFERENCE:
        from onnx.reference import ReferenceEvaluator

        truth = ReferenceEvaluator(original).run(None, feeds)[0]
        assert np.abs(got - truth).max() <= 1e-5 * scale


def test_the_original_is_never_changed():
    original = samples.conv_bn()
    before = original.SerializeToString()
    fold_onnx(original)
    assert original.SerializeToString() == before


def _values(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_bn_conv_bn_rounds_once():
    """BN1 -> Conv -> BN2: the weight is W * s1 (inputs) * s2 (outputs) computed in float64, rounded once."""
    model = samples.bn_conv()
    rng = np.random.default_rng(7)
    inits = list(model.graph.initializer)
    extra: list = []
    bn2 = samples.bn_node("y", "z", 6, rng, extra, prefix="bn2")
    model.graph.initializer.extend(extra)
    model.graph.node.append(bn2)
    model.graph.output[0].name = "z"
    v = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in list(inits) + extra}
    s1 = v["bn.scale"] / np.sqrt(v["bn.var"] + 1e-5)
    s2 = v["bn2.scale"] / np.sqrt(v["bn2.var"] + 1e-5)
    expected = (v["W"] * s1[None, :, None, None] * s2[:, None, None, None]).astype(np.float32)
    result = fold_onnx(model)
    assert len(result.folded) == 2
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv")
    assert np.array_equal(_values(result.model)[conv.input[1]], expected)


def test_shared_weight_is_copied_and_other_reader_keeps_it():
    model = samples.conv_bn(pads=(1, 1, 1, 1))
    model.graph.node.append(helper.make_node("Conv", ["x", "W"], ["other"], name="conv_other", pads=[1, 1, 1, 1]))
    model.graph.output.append(helper.make_tensor_value_info("other", onnx.TensorProto.FLOAT, [2, 8, 9, 9]))
    original_w = _values(model)["W"]
    result = fold_onnx(model)
    assert len(result.folded) == 1
    values = _values(result.model)
    assert np.array_equal(values["W"], original_w)
    conv = next(n for n in result.model.graph.node if n.name == "conv")
    assert conv.input[1] != "W"


def _with_bn_attr(**attrs):
    return samples.conv_bn(bn_attrs=attrs)


def test_refusals_are_named_and_each_bn_listed_once():
    training = _with_bn_attr(training_mode=1)
    result = fold_onnx(training, check=False)
    assert [bn for bn, _ in result.skipped] == ["bn"] and "training_mode" in result.skipped[0][1]

    graph_input = samples.conv_bn()
    graph_input.graph.input.append(helper.make_tensor_value_info("bn.mean", onnx.TensorProto.FLOAT, [8]))
    result = fold_onnx(graph_input, check=False)
    assert "graph input" in result.skipped[0][1]

    padded = samples.bn_conv(pads=(1, 1, 1, 1))
    result = fold_onnx(padded)
    assert not result.folded and "pads" in result.skipped[0][1]


def test_custom_domain_node_refuses_every_fold():
    model = samples.conv_bn()
    model.graph.node.append(helper.make_node("Mystery", ["y"], ["q"], domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    result = fold_onnx(model, check=False)
    assert not result.folded and "custom domain" in result.skipped[0][1]


def test_producer_with_another_reader_is_not_folded():
    model = samples.conv_bn()
    model.graph.output.append(helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [2, 8, 9, 9]))
    result = fold_onnx(model)
    assert not result.folded and "other readers" in result.skipped[0][1]


def test_reshape_that_moves_channels_is_refused():
    model = samples.conv_through("Reshape")
    shape = next(t for t in model.graph.initializer if t.name == "shape")
    shape.CopyFrom(numpy_helper.from_array(np.array([2, 72, 1], dtype=np.int64), "shape"))
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    rng = np.random.default_rng(0)
    replacement: list = []
    new_bn = samples.bn_node("r", "y", 72, rng, replacement)
    for t in list(model.graph.initializer):
        if t.name.startswith("bn."):
            model.graph.initializer.remove(t)
    model.graph.initializer.extend(replacement)
    bn.CopyFrom(new_bn)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 72, 1]))
    result = fold_onnx(model)
    assert not result.folded and "channel axis" in result.skipped[0][1]


def test_a_wrong_fold_is_caught_and_undone(monkeypatch):
    """Break the consumer maths (lose the shift): the check sees it and bisection undoes exactly that fold."""
    import torch

    from bnstrip.onnxfold import edit

    monkeypatch.setattr(edit, "_consumer_extra",
                        lambda weight, shift, match: torch.zeros(weight.shape[1 - match.axis], dtype=torch.float64))
    assert fold_onnx(samples.shared_weight()).folded  # producer folds do not use the broken code
    result = fold_onnx(samples.bn_gemm())
    assert not result.folded and "moves the outputs" in result.skipped[0][1]
    assert result.check.passed


def test_metadata_and_doc_strings_survive():
    model = samples.conv_bn()
    helper.set_model_props(model, {"author": "someone", "licence": "mit"})
    model.doc_string = "kept"
    result = fold_onnx(model)
    assert {p.key: p.value for p in result.model.metadata_props} == {"author": "someone", "licence": "mit"}
    assert result.model.doc_string == "kept" and result.model.producer_name == model.producer_name


def test_opset7_spatial_attribute():
    model = samples.conv_bn(opset=7, bn_attrs={"spatial": 1})
    assert fold_onnx(model).folded
    per_activation = samples.conv_bn(opset=7, bn_attrs={"spatial": 0})
    result = fold_onnx(per_activation, check=False)
    assert not result.folded and "spatial=0" in result.skipped[0][1]


def test_subgraph_reading_outer_statistics_is_refused_not_broken():
    """A BN inside an If branch whose statistics live in the main graph: listed with the reason, graph intact."""
    model = samples.in_subgraph()
    then_branch = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
    outer = [t for t in then_branch.initializer if t.name.startswith("bnT.")]
    kept = [t for t in then_branch.initializer if not t.name.startswith("bnT.")]
    model.graph.initializer.extend(outer)
    del then_branch.initializer[:]
    then_branch.initializer.extend(kept)
    onnx.checker.check_model(model, full_check=True)
    result = fold_onnx(model)
    reasons = dict(result.skipped)
    assert [bn for _, bn in result.folded] == ["if.else_branch/bnE"]
    assert "outer graph" in reasons["if.then_branch/bnT"]
    onnx.checker.check_model(result.model, full_check=True)
    assert result.check.passed


def test_computed_weight_and_constant_statistics_leave_no_dead_nodes():
    result = fold_onnx(samples.transposed_weight_constant_stats())
    assert result.folded and [n.op_type for n in result.model.graph.node] == ["MatMul", "Add"]


def test_constant_pad_is_not_folded_through():
    result = fold_onnx(samples.bn_pad_conv(mode="constant"))
    assert not result.folded and "mode=constant" in result.skipped[0][1]
