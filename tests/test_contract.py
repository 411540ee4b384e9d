"""The promises of `bnstrip fuse` hold on every path (issue 18 item 6): one matrix of input form x promise.

Forms: the smallNet checkpoint, --arch to .pt and to .safetensors, a .pt2 to a .pt2, --arch to a
.pt2, and the library's fold_model. Promises: --strict exits 1 when a BatchNorm stays unfolded
(and the JSON says "passed": false); a model whose BatchNorms all stay says so on stderr; every
path's --json has the same keys; OUT loads the documented way (the manifest beside a state_dict,
torch.export.load for a program, smallNetTest for smallNet); bad input exits 2 with one line.
Where a promise cannot apply to a form (nothing of smallNet's ever stays unfolded; the library
writes nothing), the test says so and skips.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bnstrip.testing import zoo
from bnstrip.cli import main
from bnstrip.errors import BnstripError
from bnstrip.fold.model import fold_model
from bnstrip.pipeline import FUSE_JSON_KEYS

ROOT = Path(__file__).resolve().parent.parent
CORE_KEYS = ("command", "passed", "seconds", "bnstrip_version", "torch_version")
FORMS = [pytest.param("smallnet", marks=pytest.mark.slow), "arch_pt", "arch_safetensors",
         pytest.param("pt2_pt2", marks=pytest.mark.slow), pytest.param("arch_pt2", marks=pytest.mark.slow), "library"]


class AfterRelu(nn.Module):
    """A BatchNorm after a ReLU with no layer after it: nothing can absorb it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(self.conv(x)))


MODELS = {  # kind -> (--arch, input shape): "some" folds 2 of 3 BatchNorms, "none" folds none
    "some": ("bnstrip.testing.zoo:BNBeforePaddedConv", (2, 3, 10, 10)),
    "none": (f"{__name__}:AfterRelu", (2, 3, 6, 6)),
}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return zoo.randomize_bn(zoo.BNBeforePaddedConv() if kind == "some" else AfterRelu()).eval()


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str
    output: Path
    report: dict[str, Any] | None = None


def _fuse(form: str, kind: str, tmp_path: Path, *extra: str) -> Outcome:
    """Run `bnstrip fuse` on the form's input (made here) for the model kind; --json output parsed when present."""
    arch, shape = MODELS[kind]
    if form == "smallnet":
        source, output, args = ROOT / "smallNetSaved", tmp_path / "out.pt", []
    elif form == "pt2_pt2":
        source, output, args = tmp_path / "in.pt2", tmp_path / "out.pt2", []
        model = _model(kind)
        torch.export.save(torch.export.export(model, (torch.rand(*shape),)), source)
    else:
        suffix = {"arch_pt": ".pt", "arch_safetensors": ".safetensors", "arch_pt2": ".pt2"}[form]
        source, output = tmp_path / "in.pt", tmp_path / f"out{suffix}"
        torch.save(_model(kind).state_dict(), source)
        args = ["--arch", arch, "--input-shape", ",".join(map(str, shape))]
    result = CliRunner().invoke(main, ["fuse", str(source), str(output), "--force", *args, *extra])
    report = json.loads(result.stdout) if "--json" in extra and result.stdout.strip() else None
    return Outcome(result.exit_code, result.stdout, result.stderr, output, report)


@pytest.mark.parametrize("form", FORMS)
def test_strict_exits_1_when_a_batchnorm_stays(form: str, tmp_path: Path) -> None:
    if form == "library":
        result = fold_model(_model("some"), torch.rand(*MODELS["some"][1]))
        assert [bn for bn, _ in result.skipped] == ["bn_pad"]  # what a caller gates on, with the reason
        return
    outcome = _fuse(form, "some", tmp_path, "--strict", "--json")
    assert outcome.report is not None, outcome.stderr
    stayed = outcome.report["skipped"]
    if form != "smallnet":
        assert [s["bn"] for s in stayed] == ["bn_pad"]
    assert outcome.exit_code == (1 if stayed else 0), outcome.stderr
    assert outcome.report["passed"] is (not stayed)
    assert outcome.output.exists()  # OUT is written all the same
    if stayed:
        assert "--strict" in outcome.stderr and "bn_pad" in outcome.stderr


@pytest.mark.parametrize("form", FORMS)
def test_a_model_with_none_folded_warns(form: str, tmp_path: Path) -> None:
    if form == "smallnet":
        pytest.skip("every BatchNorm of smallNet folds (or fuse refuses the checkpoint): none can stay")
    if form == "library":
        result = fold_model(_model("none"), torch.rand(*MODELS["none"][1]))
        assert result.folded == [] and any("none of its 1 BatchNorm" in w for w in result.warnings)
        return
    outcome = _fuse(form, "none", tmp_path)
    assert outcome.exit_code == 0, outcome.stderr
    assert outcome.stderr.count("none of its 1 BatchNorm(s) could be folded") == 1
    strict = _fuse(form, "none", tmp_path, "--strict")
    assert strict.exit_code == 1


@pytest.mark.parametrize("form", FORMS)
def test_every_path_has_the_same_json_keys(form: str, tmp_path: Path) -> None:
    if form == "library":
        entries = fold_model(_model("some"), torch.rand(*MODELS["some"][1])).manifest_entries()
        folded, skipped = entries["folded"], entries["skipped"]
    else:
        outcome = _fuse(form, "some", tmp_path, "--json")
        assert outcome.exit_code == 0 and outcome.report is not None, outcome.stderr
        assert tuple(outcome.report) == CORE_KEYS + tuple(k for k in FUSE_JSON_KEYS if k not in CORE_KEYS)
        folded, skipped = outcome.report["folded"], outcome.report["skipped"]
        assert outcome.report["pairs"] == [{"producer": f["layer"], "bn": f["bn"]} for f in folded]
    assert folded and all(set(f) == {"layer", "bn", "into"} for f in folded)
    assert all({"bn", "code", "reason"} <= set(s) <= {"bn", "code", "causes", "reason"} for s in skipped)


@pytest.mark.parametrize("form", FORMS)
def test_out_loads_the_documented_way(form: str, tmp_path: Path) -> None:
    if form == "library":
        pytest.skip("fold_model returns the folded model; it writes nothing")
    outcome = _fuse(form, "some", tmp_path, "--json")
    assert outcome.exit_code == 0 and outcome.report is not None, outcome.stderr
    if form == "smallnet":
        from bnstrip.homework.models import SmallNetTest

        assert outcome.report["manifest"] is None
        SmallNetTest().load_state_dict(torch.load(outcome.output, weights_only=True), strict=True)
        return
    x = torch.rand(*MODELS["some"][1])
    with torch.no_grad():
        expected = _model("some")(x)
    if form in ("pt2_pt2", "arch_pt2"):
        assert outcome.report["manifest"] is None  # a program carries its own graph
        got = torch.export.load(outcome.output).module()(x)
    else:
        from bnstrip import load_folded

        assert outcome.report["manifest"] and Path(outcome.report["manifest"]).exists()
        with torch.no_grad():
            got = load_folded(zoo.BNBeforePaddedConv(), outcome.output)(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", FORMS)
def test_bad_input_exits_2_with_one_line(form: str, tmp_path: Path) -> None:
    if form == "library":
        with pytest.raises(BnstripError) as info:
            fold_model(_model("some"), None, reparameterize=True)
        assert info.value.exit_code == 2
        return
    missing = tmp_path / ("missing.pt2" if form == "pt2_pt2" else "missing.pt")
    arch, shape = MODELS["some"]
    extra = [] if form in ("smallnet", "pt2_pt2") else ["--arch", arch, "--input-shape", ",".join(map(str, shape))]
    out = tmp_path / ("out.pt2" if form in ("pt2_pt2", "arch_pt2") else "out.safetensors" if "safetensors" in form
                      else "out.pt")
    result = CliRunner().invoke(main, ["fuse", str(missing), str(out), *extra])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("bnstrip: error:") and result.stderr.count("\n") == 1
    assert not out.exists()
