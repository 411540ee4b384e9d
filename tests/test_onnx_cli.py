"""`bnstrip fuse IN.onnx OUT.onnx`, `verify A.onnx B.onnx` and `fuse --arch ... OUT.onnx` through the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from click.testing import CliRunner

from bnstrip.cli import main
from bnstrip.onnxfold import samples


def _save(model, path):
    path.write_bytes(model.SerializeToString())
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_fuse_json_has_fuse_keys_and_manifest(tmp_path):
    src = _save(samples.shared_weight(), tmp_path / "in.onnx")
    result = invoke("fuse", src, tmp_path / "out.onnx", "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    from bnstrip.pipeline import FUSE_JSON_KEYS  # the keys of every fuse path (tests/test_contract.py)

    core = ("command", "passed", "seconds", "bnstrip_version", "torch_version")
    assert tuple(payload) == core + tuple(k for k in FUSE_JSON_KEYS if k not in core) + ("external_data",)
    assert payload["passed"] and [f["bn"] for f in payload["folded"]] == ["bn1", "bn2"]
    manifest = json.loads((tmp_path / "out.onnx.bnstrip.json").read_text())
    assert manifest["form"] == "onnx" and len(manifest["output_sha256"]) == 64
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def test_strict_exits_1_when_a_bn_is_left(tmp_path):
    src = _save(samples.bn_conv(pads=(1, 1, 1, 1)), tmp_path / "in.onnx")
    plain = invoke("fuse", src, tmp_path / "a.onnx")
    assert plain.exit_code == 0 and "Not folded" in plain.stdout and "pads" in plain.stdout
    strict = invoke("fuse", src, tmp_path / "b.onnx", "--strict")
    assert strict.exit_code == 1 and (tmp_path / "b.onnx").is_file()


def test_onnx_in_needs_onnx_out_and_no_torch_options(tmp_path):
    src = _save(samples.conv_bn(), tmp_path / "in.onnx")
    wrong = invoke("fuse", src, tmp_path / "out.pt")
    assert wrong.exit_code == 2 and "*.onnx" in wrong.stderr
    usage = invoke("fuse", src, tmp_path / "out.onnx", "--eps", "1e-3")
    assert usage.exit_code == 2


def test_verify_passes_folded_and_fails_tampered(tmp_path):
    src = _save(samples.conv_bn(), tmp_path / "in.onnx")
    assert invoke("fuse", src, tmp_path / "out.onnx").exit_code == 0
    ok = invoke("verify", src, tmp_path / "out.onnx", "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["passed"]
    tampered = onnx.load(str(tmp_path / "out.onnx"))
    bias = next(t for t in tampered.graph.initializer if t.name not in ("W",) and len(t.dims) == 1)
    array = onnx.numpy_helper.to_array(bias).copy()
    array[0] += 1e-2
    bias.CopyFrom(onnx.numpy_helper.from_array(array, bias.name))
    bad = _save(tampered, tmp_path / "bad.onnx")
    failed = invoke("verify", src, bad)
    assert failed.exit_code == 1 and "float64" in failed.stderr
    np.savez(tmp_path / "x.npz", x=np.ones((2, 4, 9, 9), dtype=np.float32))
    given = invoke("verify", src, tmp_path / "out.onnx", "--inputs", tmp_path / "x.npz")
    assert given.exit_code == 0, given.stderr


def test_help_imports_neither_onnx_nor_torch():
    code = ("import sys\nfrom bnstrip.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_fuse_arch_exports_a_proven_onnx(tmp_path):
    import torch

    from bnstrip.testing.zoo import build

    model, _ = build("MLPBothSides")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    result = invoke("fuse", tmp_path / "m.pt", tmp_path / "m.onnx", "--arch", "bnstrip.testing.zoo:MLPBothSides",
                    "--input-shape", "4,12", "--json")
    assert result.exit_code == 0, result.stderr
    exported = onnx.load(str(tmp_path / "m.onnx"))
    assert not any(n.op_type == "BatchNormalization" for n in exported.graph.node)
    assert json.loads(result.stdout)["self_check_max_abs_diff"] <= json.loads(result.stdout)["self_check_tolerance"]


def test_custom_domain_model_lists_every_bn_and_writes_it_unchanged(tmp_path):
    from onnx import helper

    model = samples.conv_bn()
    model.graph.node.append(helper.make_node("Mystery", ["y"], ["q"], domain="com.example"))
    model.graph.output.append(helper.make_tensor_value_info("q", onnx.TensorProto.FLOAT, None))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    src = _save(model, tmp_path / "in.onnx")
    result = invoke("fuse", src, tmp_path / "out.onnx")
    assert result.exit_code == 0, result.stderr
    assert "custom domain" in result.stdout and "nothing to check" in result.stdout
    assert "none of its 1 BatchNorm(s) could be folded" in result.stderr
    assert onnx.load(str(tmp_path / "out.onnx")).graph == model.graph
