"""bnstrip.fold_program: exported programs fold with fold_model's rules, load back, match, stay dynamic."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import bnstrip
from bnstrip.testing import zoo
from bnstrip.errors import CheckFailed, InputError

PROGRAM_ZOO = ["Conv1dNet", "Conv3dNet", "ConvTransposeDecoder", "MLPBothSides", "LinearBNSequence", "ReusedConv",
               "BNBeforePaddedConv", "SubclassNet"]
"""The zoo minus the two big replicas (MobileNetV2Style is checked with a dynamic batch below; time)."""


def _names(pairs):
    return sorted(b for b, _ in pairs)


@dataclass
class _Exported:
    model: nn.Module
    x: torch.Tensor
    program: object
    """The exported input program (fold_program must leave it untouched: `before` is its state then)."""
    before: dict[str, torch.Tensor]
    result: object


@pytest.fixture(scope="module")
def exported():
    """name -> a zoo model exported and folded once for every test of this module (exporting is the slow part)."""
    cache: dict[str, _Exported] = {}

    def get(name: str) -> _Exported:
        if name not in cache:
            model, x = zoo.build(name)
            program = torch.export.export(model, (x,))
            before = {k: v.clone() for k, v in program.state_dict.items()}
            cache[name] = _Exported(model, x, program, before, bnstrip.fold_program(program))
        return cache[name]

    return get


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, BN) names of every BatchNorm that sits right after a conv in an nn.Sequential (zoo.conv_bn)."""
    return sorted((f"{name}.{i - 1}", f"{name}.{i}") for name, seq in model.named_modules()
                  if isinstance(seq, nn.Sequential) for i in range(1, len(seq))
                  if isinstance(seq[i], nn.BatchNorm2d) and isinstance(seq[i - 1], nn.Conv2d))


def _roundtrip(program, tmp_path, name="out.pt2"):
    path = tmp_path / name
    torch.export.save(program, path)
    return torch.export.load(path)


@pytest.mark.parametrize("name", PROGRAM_ZOO)
def test_zoo_programs_fold_like_their_modules(name, tmp_path, exported):
    case = exported(name)
    model, x, result = case.model, case.x, case.result
    expected = bnstrip.fold_model(model, (x,))
    assert sorted(result.folded) == sorted(expected.folded)
    assert _names(result.skipped) == _names(expected.skipped)
    assert result.self_check is not None and result.self_check.passed
    # the input program is untouched
    assert all(torch.equal(case.before[k], v) for k, v in case.program.state_dict.items())
    # the folded program has no folded BatchNorm tensors left, loads back, and matches the BN model
    state = result.program.state_dict
    for _, bn in expected.folded:
        assert not any(k.startswith(bn + ".") for k in state), bn
    loaded = _roundtrip(result.program, tmp_path).module()
    with torch.no_grad():
        ref = model(x)
        got = loaded(x)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max())))


def test_folded_ops_are_gone_and_conv_gains_bias(exported):
    result = exported("Conv3dNet").result
    targets = [str(n.target) for n in result.program.graph.nodes if n.op == "call_function"]
    assert not any("batch_norm" in t for t in targets)
    assert "conv2" in result.gained_bias
    assert result.program.state_dict["conv2.bias"].shape == (8,)


@pytest.mark.slow
def test_dynamic_batch_stays_dynamic(tmp_path):
    model, x = zoo.build("MobileNetV2Style")
    batch = torch.export.Dim("batch", min=1, max=64)
    program = _roundtrip(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), tmp_path, "in.pt2")
    result = bnstrip.fold_program(program)
    assert sorted(result.folded) == _conv_bn_pairs(model) and len(result.folded) == 11  # depthwise convs included
    assert result.dynamic_dims
    (symbol, bounds), = result.program.range_constraints.items()
    assert (int(bounds.lower), int(bounds.upper)) == (1, 64)
    loaded = _roundtrip(result.program, tmp_path).module()
    for n in (1, 5):
        xs = torch.randn(n, 3, 16, 16)
        with torch.no_grad():
            assert torch.allclose(loaded(xs), model(xs), atol=1e-4)


@pytest.mark.slow
def test_smallnet_program_folds_like_the_module():
    from bnstrip.homework.models import SMALLNET_PAIRS, SmallNetTrain

    torch.manual_seed(0)
    model = zoo.randomize_bn(SmallNetTrain()).eval()
    x = torch.randn(2, 3, 32, 32)
    result = bnstrip.fold_program(torch.export.export(model, (x,)))
    assert sorted(result.folded) == sorted(SMALLNET_PAIRS)
    assert result.self_check is not None and result.self_check.passed


class _TwiceNet(nn.Module):
    """One conv and one BN each called twice (issue 13): the program has two aten calls on the same tensors."""

    def __init__(self, second_conv: bool = False):
        super().__init__()
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 1) if second_conv else None
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        second = self.c if self.c2 is None else self.c2
        return self.bn(second(torch.relu(self.bn(self.c(x)))))


@pytest.mark.parametrize("second_conv", [False, True], ids=["same-conv-twice", "two-convs-one-bn"])
def test_layers_called_twice_fold_like_the_module(second_conv):
    torch.manual_seed(0)
    model = zoo.randomize_bn(_TwiceNet(second_conv)).eval()
    x = torch.randn(2, 4, 8, 8)
    expected = bnstrip.fold_model(model, (x,))
    result = bnstrip.fold_program(torch.export.export(model, (x,)))
    assert sorted(result.folded) == sorted(expected.folded)
    assert _names(result.skipped) == _names(expected.skipped)
    assert result.folded == ([] if second_conv else [("c", "bn")])
    assert result.self_check is not None and result.self_check.passed
    assert torch.allclose(result.program.module()(x), model(x), atol=1e-5)


def test_kwargs_and_training_bn_are_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.conv_t = nn.Conv2d(4, 4, 1)
            self.bn_t = nn.BatchNorm2d(4, track_running_stats=False)

        def forward(self, x, *, scale):
            return self.bn_t(self.conv_t(self.bn(self.conv(x)))) * scale

    model = zoo.randomize_bn(Net()).eval()
    args, kwargs = (torch.randn(2, 3, 8, 8),), {"scale": torch.tensor(2.0)}
    result = bnstrip.fold_program(torch.export.export(model, args, kwargs))
    assert result.folded == [("conv", "bn")]
    assert "batch statistics" in dict(result.skipped)["bn_t"]
    assert torch.allclose(result.program.module()(*args, **kwargs), model(*args, **kwargs), atol=1e-5)


def test_refuses_what_is_not_a_program():
    with pytest.raises(InputError, match="not an ExportedProgram"):
        bnstrip.fold_program(nn.Linear(2, 2))


def test_moved_outputs_are_refused(monkeypatch, exported):
    """A fold that changes the outputs (here: a sabotaged re-export) is never returned."""
    import bnstrip.fold.program as program_mod

    program = exported("MLPBothSides").program
    real_export = program_mod._export

    def sabotaged(module, args, kwargs, dynamic):
        out = real_export(module, args, kwargs, dynamic)
        with torch.no_grad():
            out.state_dict["fc1.bias"].add_(1.0)
        return out

    monkeypatch.setattr(program_mod, "_export", sabotaged)
    with pytest.raises(CheckFailed, match="not writing the folded program"):
        bnstrip.fold_program(program)


def test_cli_fuse_and_verify_programs(tmp_path, exported):
    from click.testing import CliRunner

    from bnstrip.cli import main

    case = exported("MLPBothSides")
    model, x = case.model, case.x
    src, out, inputs = tmp_path / "m.pt2", tmp_path / "folded.pt2", tmp_path / "x.pt"
    torch.export.save(case.program, src)
    torch.save(x * 3, inputs)
    runner = CliRunner()
    fused = runner.invoke(main, ["fuse", str(src), str(out), "--json"])
    assert fused.exit_code == 0, fused.output
    loaded = torch.export.load(out).module()
    assert torch.allclose(loaded(x), model(x), atol=1e-4)
    checked = runner.invoke(main, ["verify", str(src), str(out), "--inputs", str(inputs), "--json"])
    assert checked.exit_code == 0, checked.output
    again = runner.invoke(main, ["fuse", str(src), str(out)])  # exists, no --force
    assert again.exit_code == 2


def test_cli_refuses_hostile_program_in_one_line(tmp_path):
    from click.testing import CliRunner

    from bnstrip.cli import main

    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    result = CliRunner().invoke(main, ["fuse", str(bad), str(tmp_path / "out.pt2")])
    assert result.exit_code == 2
    assert not (tmp_path / "out.pt2").exists()
