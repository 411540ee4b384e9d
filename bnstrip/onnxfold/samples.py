"""Small hand-built ONNX graphs, one per fold pattern and refusal, for tests and scripts/onnx_zoo.py.

Exporters never produce some of these (grouped ConvTranspose -> BN, BN -> Conv, 3-D MatMul,
shared weights, opset 9), so they are built here with onnx.helper. Statistics are random but
sane (positive variance), so a fold with a wrong axis or a lost shift shows in the outputs.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

SEED = 0


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def init(name: str, array: np.ndarray) -> Any:
    import onnx

    return onnx.numpy_helper.from_array(np.asarray(array), name)


def bn_node(x: str, y: str, channels: int, rng: np.random.Generator, inits: list[Any], prefix: str = "bn",
            **attrs: Any) -> Any:
    """A BatchNormalization node with random statistics added to `inits`."""
    import onnx

    names = [f"{prefix}.{k}" for k in ("scale", "B", "mean", "var")]
    values = [rng.uniform(0.5, 2.0, channels), rng.normal(0, 1, channels), rng.normal(0, 1, channels),
              rng.uniform(0.2, 3.0, channels)]
    inits.extend(init(n, v.astype(np.float32)) for n, v in zip(names, values, strict=True))
    return onnx.helper.make_node("BatchNormalization", [x, *names], [y], name=prefix, **attrs)


def model(nodes: list[Any], inits: list[Any], inputs: dict[str, list[Any]], outputs: dict[str, list[Any] | None],
          opset: int = 17, ir_version: int | None = None) -> Any:
    import onnx

    graph = onnx.helper.make_graph(
        nodes, "g",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in inputs.items()],
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in outputs.items()],
        initializer=inits)
    made = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)],
                                  producer_name="bnstrip-samples")
    made.ir_version = ir_version or min(made.ir_version, 8 if opset < 21 else made.ir_version)
    inferred = onnx.shape_inference.infer_shapes(made)  # the outputs' shapes, which full_check requires
    del made.graph.output[:]
    made.graph.output.extend(inferred.graph.output)
    return made


def conv_bn(groups: int = 1, pads: tuple[int, ...] = (1, 1, 1, 1), bias: bool = True, seed: int = SEED,
            strides: tuple[int, int] = (1, 1), dilations: tuple[int, int] = (1, 1), auto_pad: str | None = None,
            opset: int = 17, bn_attrs: dict[str, Any] | None = None) -> Any:
    import onnx

    rng, inits = _rng(seed), list[Any]()
    cin, cout = 4, 8
    inits.append(init("W", rng.normal(0, 0.5, (cout, cin // groups, 3, 3)).astype(np.float32)))
    inputs = ["x", "W"]
    if bias:
        inits.append(init("b", rng.normal(0, 0.5, cout).astype(np.float32)))
        inputs.append("b")
    conv_attrs: dict[str, Any] = {"group": groups, "strides": list(strides), "dilations": list(dilations)}
    if auto_pad:
        conv_attrs["auto_pad"] = auto_pad
    else:
        conv_attrs["pads"] = list(pads)
    nodes = [onnx.helper.make_node("Conv", inputs, ["c"], name="conv", **conv_attrs),
             bn_node("c", "y", cout, rng, inits, **(bn_attrs or {}))]
    return model(nodes, inits, {"x": [2, cin, 9, 9]}, {"y": None}, opset=opset)


def convtranspose_bn(groups: int = 2, seed: int = SEED, bias: bool = False) -> Any:
    import onnx

    rng, inits = _rng(seed), list[Any]()
    cin, cout = 4, 6
    inits.append(init("W", rng.normal(0, 0.5, (cin, cout // groups, 3, 3)).astype(np.float32)))
    inputs = ["x", "W"] + (["b"] if bias else [])
    if bias:
        inits.append(init("b", rng.normal(0, 0.5, cout).astype(np.float32)))
    nodes = [onnx.helper.make_node("ConvTranspose", inputs, ["c"], name="deconv", group=groups, strides=[2, 2],
                                   pads=[1, 1, 1, 1], output_padding=[1, 1], dilations=[1, 1]),
             bn_node("c", "y", cout, rng, inits)]
    return model(nodes, inits, {"x": [2, cin, 5, 5]}, {"y": None})


def gemm_bn(trans_b: int = 1, alpha: float = 0.7, beta: float = 1.5, bias: bool = True, seed: int = SEED) -> Any:
    import onnx

    rng, inits = _rng(seed), list[Any]()
    k, n = 6, 5
    inits.append(init("W", rng.normal(0, 0.5, (n, k) if trans_b else (k, n)).astype(np.float32)))
    inputs = ["x", "W"] + (["C"] if bias else [])
    if bias:
        inits.append(init("C", rng.normal(0, 0.5, (1, n)).astype(np.float32)))
    nodes = [onnx.helper.make_node("Gemm", inputs, ["g"], name="gemm", transB=trans_b, alpha=alpha, beta=beta),
             bn_node("g", "y", n, rng, inits)]
    return model(nodes, inits, {"x": [3, k]}, {"y": None})


def matmul_bn(add: bool = True, three_d: bool = False, seed: int = SEED) -> Any:
    """MatMul(x, W) (+ b) -> BN on 2-D, or MatMul(W, x) (+ b) -> BN on 3-D (channels are W's rows)."""
    import onnx

    rng, inits = _rng(seed), list[Any]()
    if three_d:
        m, k, length = 5, 4, 7
        inits.append(init("W", rng.normal(0, 0.5, (m, k)).astype(np.float32)))
        mm = onnx.helper.make_node("MatMul", ["W", "x"], ["m"], name="matmul")
        shape, channels, bias_shape = [2, k, length], m, (m, 1)  # type: tuple[list[int], int, tuple[int, ...]]
    else:
        k, n = 6, 5
        inits.append(init("W", rng.normal(0, 0.5, (k, n)).astype(np.float32)))
        mm = onnx.helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul")
        shape, channels, bias_shape = [3, k], n, (n,)
    nodes = [mm]
    last = "m"
    if add:
        inits.append(init("b", rng.normal(0, 0.5, bias_shape).astype(np.float32)))
        nodes.append(onnx.helper.make_node("Add", ["m", "b"], ["a"], name="add"))
        last = "a"
    nodes.append(bn_node(last, "y", channels, rng, inits))
    return model(nodes, inits, {"x": shape}, {"y": None})


def bn_conv(pads: tuple[int, ...] = (0, 0, 0, 0), groups: int = 1, seed: int = SEED, zero_shift: bool = False) -> Any:
    import onnx

    rng, inits = _rng(seed), list[Any]()
    cin, cout = 4, 6
    bn = bn_node("x", "n", cin, rng, inits)
    if zero_shift:  # mean = B = 0: the shift is exactly zero, so padding stays exact
        inits[1] = init("bn.B", np.zeros(cin, dtype=np.float32))
        inits[2] = init("bn.mean", np.zeros(cin, dtype=np.float32))
    inits.append(init("W", rng.normal(0, 0.5, (cout, cin // groups, 3, 3)).astype(np.float32)))
    inits.append(init("b", rng.normal(0, 0.5, cout).astype(np.float32)))
    nodes = [bn, onnx.helper.make_node("Conv", ["n", "W", "b"], ["y"], name="conv", pads=list(pads), group=groups)]
    return model(nodes, inits, {"x": [2, cin, 8, 8]}, {"y": None})


def bn_gemm(trans_b: int = 0, alpha: float = 1.3, beta: float = 0.5, seed: int = SEED) -> Any:
    import onnx

    rng, inits = _rng(seed), list[Any]()
    k, n = 6, 4
    bn = bn_node("x", "n", k, rng, inits)
    inits.append(init("W", rng.normal(0, 0.5, (n, k) if trans_b else (k, n)).astype(np.float32)))
    inits.append(init("C", rng.normal(0, 0.5, n).astype(np.float32)))
    nodes = [bn, onnx.helper.make_node("Gemm", ["n", "W", "C"], ["y"], name="gemm", transB=trans_b, alpha=alpha,
                                       beta=beta)]
    return model(nodes, inits, {"x": [3, k]}, {"y": None})


def bn_matmul(three_d: bool = False, seed: int = SEED) -> Any:
    import onnx

    rng, inits = _rng(seed), list[Any]()
    if three_d:
        k, m, length = 4, 5, 7
        bn = bn_node("x", "n", k, rng, inits)
        inits.append(init("W", rng.normal(0, 0.5, (m, k)).astype(np.float32)))
        mm = onnx.helper.make_node("MatMul", ["W", "n"], ["y"], name="matmul")
        shape = [2, k, length]
    else:
        k, n = 6, 4
        bn = bn_node("x", "n", k, rng, inits)
        inits.append(init("W", rng.normal(0, 0.5, (k, n)).astype(np.float32)))
        mm = onnx.helper.make_node("MatMul", ["n", "W"], ["y"], name="matmul")
        shape = [3, k]
    return model([bn, mm], inits, {"x": shape}, {"y": None})


def conv_through(op: str, seed: int = SEED) -> Any:
    """Conv -> Identity/Dropout/Flatten/Reshape -> BN (Flatten/Reshape keep the channel axis: 1x1 spatial)."""
    import onnx

    rng, inits = _rng(seed), list[Any]()
    inits.append(init("W", rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32)))
    conv = onnx.helper.make_node("Conv", ["x", "W"], ["c"], name="conv")
    if op == "Flatten":
        mid = onnx.helper.make_node("Flatten", ["c"], ["r"], name="flat", axis=1)
    elif op == "Reshape":
        inits.append(init("shape", np.array([2, 8, 9], dtype=np.int64)))
        mid = onnx.helper.make_node("Reshape", ["c", "shape"], ["r"], name="reshape")
    else:
        mid = onnx.helper.make_node(op, ["c"], ["r"], name=op.lower())
    size = 3 if op in ("Flatten",) else 5
    shape = {"Flatten": [2, 4, 3, 3], "Reshape": [2, 4, 5, 5]}.get(op, [2, 4, size, size])
    return model([conv, mid, bn_node("r", "y", 8, rng, inits)], inits, {"x": shape}, {"y": None})


def shared_weight(seed: int = SEED) -> Any:
    """Two Convs reading one weight, each followed by its own BN: the weight is copied, never folded twice."""
    import onnx

    rng, inits = _rng(seed), list[Any]()
    inits.append(init("W", rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32)))
    nodes = [onnx.helper.make_node("Conv", ["x", "W"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             bn_node("c1", "h", 4, rng, inits, prefix="bn1"),
             onnx.helper.make_node("Conv", ["h", "W"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             bn_node("c2", "y", 4, rng, inits, prefix="bn2")]
    return model(nodes, inits, {"x": [2, 4, 6, 6]}, {"y": None})


def bn_pad_conv(mode: str = "reflect", seed: int = SEED) -> Any:
    """BN -> Pad(reflect/edge) -> unpadded Conv: padding that repeats values commutes with a per-channel affine map."""
    import onnx

    rng, inits = _rng(seed), list[Any]()
    bn = bn_node("x", "n", 4, rng, inits)
    inits.append(init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64)))
    inits.append(init("W", rng.normal(0, 0.5, (6, 4, 3, 3)).astype(np.float32)))
    nodes = [bn, onnx.helper.make_node("Pad", ["n", "pads"], ["p"], name="pad", mode=mode),
             onnx.helper.make_node("Conv", ["p", "W"], ["y"], name="conv")]
    return model(nodes, inits, {"x": [2, 4, 6, 6]}, {"y": None})


def transposed_weight_constant_stats(seed: int = SEED) -> Any:
    """MatMul(x, Transpose(W)) -> BN whose scale and B are Constant nodes (what torch exports for a bias-free
    Linear and an affine=False BatchNorm1d): the weight is evaluated once, the Constants go with the BN."""
    import onnx

    rng, inits = _rng(seed), list[Any]()
    inits.append(init("W", rng.normal(0, 0.5, (5, 6)).astype(np.float32)))
    bn = bn_node("m", "y", 5, rng, inits)
    constants = []
    for index, value in ((1, np.ones(5, np.float32)), (2, np.zeros(5, np.float32))):
        name = f"const{index}"
        constants.append(onnx.helper.make_node("Constant", [], [name], value=init(name, value)))
        inits = [t for t in inits if t.name != bn.input[index]]
        bn.input[index] = name
    nodes = [onnx.helper.make_node("Transpose", ["W"], ["Wt"], name="transpose"),
             onnx.helper.make_node("MatMul", ["x", "Wt"], ["m"], name="matmul"), *constants, bn]
    return model(nodes, inits, {"x": [3, 6]}, {"y": None})


def bn_flatten_gemm(seed: int = SEED) -> Any:
    """BN on (N, C, H, W) -> Flatten -> Gemm: each channel's (s, t) covers H*W consecutive Gemm inputs."""
    import onnx

    rng, inits = _rng(seed), list[Any]()
    bn = bn_node("x", "n", 3, rng, inits)
    inits.append(init("W", rng.normal(0, 0.5, (5, 3 * 2 * 2)).astype(np.float32)))
    inits.append(init("C", rng.normal(0, 0.5, 5).astype(np.float32)))
    nodes = [bn, onnx.helper.make_node("Flatten", ["n"], ["f"], name="flatten", axis=1),
             onnx.helper.make_node("Gemm", ["f", "W", "C"], ["y"], name="gemm", transB=1)]
    return model(nodes, inits, {"x": [2, 3, 2, 2]}, {"y": None})


def opset9(seed: int = SEED) -> Any:
    return conv_bn(seed=seed, opset=9)


def in_subgraph(seed: int = SEED) -> Any:
    """An If whose branches each hold Conv -> BN."""
    import onnx

    rng = _rng(seed)

    def branch(tag: str) -> Any:
        inits: list[Any] = [init(f"W{tag}", rng.normal(0, 0.5, (4, 4, 1, 1)).astype(np.float32))]
        nodes = [onnx.helper.make_node("Conv", ["x", f"W{tag}"], [f"c{tag}"], name=f"conv{tag}"),
                 bn_node(f"c{tag}", f"y{tag}", 4, rng, inits, prefix=f"bn{tag}")]
        out = onnx.helper.make_tensor_value_info(f"y{tag}", onnx.TensorProto.FLOAT, None)
        return onnx.helper.make_graph(nodes, f"branch{tag}", [], [out], initializer=inits)

    cond_init = [init("cond", np.array(True))]
    node = onnx.helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("T"), else_branch=branch("E"))
    return model([node], cond_init, {"x": [1, 4, 3, 3]}, {"y": None})


SAMPLES: dict[str, Callable[[], Any]] = {
    "conv_bn": conv_bn,
    "conv_bn_grouped_strided": lambda: conv_bn(groups=2, strides=(2, 2), dilations=(2, 2), bias=False),
    "conv_bn_same": lambda: conv_bn(auto_pad="SAME_UPPER"),
    "convtranspose_g2_bn": convtranspose_bn,
    "gemm_bn": gemm_bn,
    "gemm_noTrans_nobias_bn": lambda: gemm_bn(trans_b=0, bias=False),
    "matmul_add_bn": matmul_bn,
    "matmul_bn": lambda: matmul_bn(add=False),
    "matmul3d_bn": lambda: matmul_bn(three_d=True),
    "bn_conv": bn_conv,
    "bn_conv_grouped": lambda: bn_conv(groups=2),
    "bn_conv_padded_zero_shift": lambda: bn_conv(pads=(1, 1, 1, 1), zero_shift=True),
    "bn_gemm": bn_gemm,
    "bn_gemm_transB": lambda: bn_gemm(trans_b=1),
    "bn_matmul": bn_matmul,
    "bn_matmul3d": lambda: bn_matmul(three_d=True),
    "conv_identity_bn": lambda: conv_through("Identity"),
    "conv_dropout_bn": lambda: conv_through("Dropout"),
    "conv_flatten_bn": lambda: conv_through("Flatten"),
    "conv_reshape_bn": lambda: conv_through("Reshape"),
    "bn_reflectpad_conv": bn_pad_conv,
    "bn_edgepad_conv": lambda: bn_pad_conv("edge"),
    "transposed_weight_constant_stats": transposed_weight_constant_stats,
    "bn_flatten_gemm": bn_flatten_gemm,
    "shared_weight": shared_weight,
    "opset9": opset9,
    "if_subgraph": in_subgraph,
}
"""Every graph here folds completely (each BatchNormalization has an exact fold)."""
