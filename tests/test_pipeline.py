"""fuse_file (the one writer) and load_folded on zoo checkpoints, through the library and `bnstrip fuse --arch`.

Ground truth is the original model run in eval mode; the written file is loaded back with
load_folded or into a fresh instance of the original class.
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bnstrip import load_folded  # noqa: E402
from bnstrip.testing import zoo  # noqa: E402
from bnstrip.cli import main  # noqa: E402
from bnstrip.core.compare import seeded_inputs  # noqa: E402
from bnstrip.errors import InputError  # noqa: E402
from bnstrip.io.manifest import manifest_path  # noqa: E402
from bnstrip.pipeline import fuse_file  # noqa: E402
from test_fold_model import REL_TOL, executed_batch_norms, rel_diff, run  # noqa: E402


# --------------------------------------------------------------------------- fuse_checkpoint + load_folded


def fuse_checkpoint(input_path: str, output_path: str, arch: str, shape: list[int]):
    """`bnstrip fuse --arch` as a library call."""
    factory = getattr(zoo, arch.partition(":")[2])
    return fuse_file(input_path, output_path, factory, seeded_inputs(shape), arch=arch)


def _save_zoo_checkpoint(name: str, path: Path) -> tuple[nn.Module, torch.Tensor]:
    model, x = zoo.build(name)
    torch.save(model.state_dict(), path)
    return model, x


@pytest.mark.parametrize("name, form", [("MLPBothSides", "modules"), ("SubclassNet", "graph")])
def test_load_folded_rebuilds_the_written_model(tmp_path: Path, name: str, form: str) -> None:
    model, x = _save_zoo_checkpoint(name, tmp_path / "in.pt")
    report = fuse_checkpoint(str(tmp_path / "in.pt"), str(tmp_path / "out.pt"), f"bnstrip.testing.zoo:{name}", list(x.shape))
    assert report.result.form == form and report.self_check.passed
    manifest = json.loads(manifest_path(tmp_path / "out.pt").read_text())
    assert manifest["folded"] == [{"layer": layer, "bn": b, "into": report.result.into[b]} for layer, b in report.result.folded]
    assert manifest["gained_bias"] == report.result.gained_bias and manifest["gained_bias"]
    assert [(e["bn"], e["reason"]) for e in manifest["skipped"]] == report.result.skipped
    assert manifest["form"] == form and manifest["self_check"]["max_abs_diff"] <= manifest["self_check"]["tolerance"]
    rebuilt = load_folded(zoo.ZOO[name][0](), tmp_path / "out.pt")
    assert rel_diff(run(model, x), run(rebuilt, x)) <= REL_TOL
    assert executed_batch_norms(rebuilt, x) == len(report.result.skipped)


def test_load_folded_refuses_a_changed_checkpoint_or_a_missing_manifest(tmp_path: Path) -> None:
    _, x = _save_zoo_checkpoint("MLPBothSides", tmp_path / "in.pt")
    fuse_checkpoint(str(tmp_path / "in.pt"), str(tmp_path / "out.pt"), "bnstrip.testing.zoo:MLPBothSides", list(x.shape))
    state = torch.load(tmp_path / "out.pt", weights_only=True)
    state["fc3.bias"] += 1
    torch.save(state, tmp_path / "out.pt")
    with pytest.raises(InputError, match="file changed since .* was written"):
        load_folded(zoo.MLPBothSides(), tmp_path / "out.pt")
    torch.save(state, tmp_path / "bare.pt")
    with pytest.raises(InputError, match="no manifest .* says which BatchNorms were folded"):
        load_folded(zoo.MLPBothSides(), tmp_path / "bare.pt")


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def at_repo_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    """`--arch bnstrip.testing.zoo:...` is resolved from the current directory, as a user would run it."""
    monkeypatch.chdir(ROOT)
    return ROOT


def test_cli_fuse_arch_writes_a_loadable_model_and_its_manifest(tmp_path: Path, at_repo_root: Path) -> None:
    model, x = _save_zoo_checkpoint("LinearBNSequence", tmp_path / "in.pt")
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(main, ["fuse", "--arch", "bnstrip.testing.zoo:LinearBNSequence", str(tmp_path / "in.pt"),
                                       str(out), "--input-shape", "3,8,8"])
    assert result.exit_code == 0, result.output
    assert "bn_head" in result.stdout and "Not folded (1)" in result.stdout and "self-check" in result.stdout
    assert manifest_path(out).is_file()
    rebuilt = load_folded(zoo.LinearBNSequence(), out)
    assert rel_diff(run(model, x), run(rebuilt, x)) <= REL_TOL


def test_cli_keep_structure_json_loads_into_the_original_class(tmp_path: Path, at_repo_root: Path) -> None:
    model, x = _save_zoo_checkpoint("ReusedConv", tmp_path / "in.pt")
    out = tmp_path / "out.pt"
    result = CliRunner().invoke(main, ["fuse", "--arch", "bnstrip.testing.zoo:ReusedConv", str(tmp_path / "in.pt"), str(out),
                                       "--input-shape", "2,4,8,8", "--keep-structure", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["form"] == "keep-structure"
    assert payload["folded"] == [{"layer": "conv_out", "bn": "bn_out", "into": "producer"}]
    assert {s["bn"] for s in payload["skipped"]} == {"bn_a", "bn_b"}
    assert all(s["code"] == "CALL_COUNT" and s["reason"] for s in payload["skipped"])
    assert payload["self_check_max_abs_diff"] <= payload["self_check_tolerance"]
    fresh = zoo.ReusedConv().eval()
    fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert rel_diff(run(model, x), run(fresh, x)) <= REL_TOL


def test_cli_eps_override_reaches_the_fold(tmp_path: Path, at_repo_root: Path) -> None:
    _save_zoo_checkpoint("Conv3dNet", tmp_path / "in.pt")
    result = CliRunner().invoke(main, ["fuse", "--arch", "bnstrip.testing.zoo:Conv3dNet", str(tmp_path / "in.pt"),
                                       str(tmp_path / "out.pt"), "--input-shape", "1,2,4,4,4", "--eps", "1e-3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["eps"] == 1e-3
    assert json.loads(manifest_path(tmp_path / "out.pt").read_text())["eps"] == 1e-3


@pytest.mark.parametrize("args, fragment", [
    (["--arch", "bnstrip.testing.zoo:MLPBothSides"], "--input-shape is required"),
    (["--arch", "bnstrip.testing.zoo:NoSuchNet", "--input-shape", "4,12"], "has no attribute 'NoSuchNet'"),
    (["--arch", "nowhere_module_q:Net", "--input-shape", "4,12"], "module 'nowhere_module_q' not found"),
    (["--arch", "bnstrip.testing.zoo:ReusedConv", "--input-shape", "4,12"], "does not load strictly into ReusedConv"),
    (["--arch", "bnstrip.testing.zoo:MLPBothSides", "--input-shape", "4,x"], "not a comma-separated list of integers"),
    (["--arch", "bnstrip.testing.zoo:MLPBothSides", "--input-shape", "4,13"], "do not run through MLPBothSides"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, at_repo_root: Path, args: list[str], fragment: str) -> None:
    _save_zoo_checkpoint("MLPBothSides", tmp_path / "in.pt")
    result = CliRunner().invoke(main, ["fuse", str(tmp_path / "in.pt"), str(tmp_path / "out.pt"), *args])
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.pt").exists() and not manifest_path(tmp_path / "out.pt").exists()


def test_cli_refuses_to_overwrite_without_force(tmp_path: Path, at_repo_root: Path) -> None:
    _save_zoo_checkpoint("MLPBothSides", tmp_path / "in.pt")
    args = ["fuse", "--arch", "bnstrip.testing.zoo:MLPBothSides", str(tmp_path / "in.pt"), str(tmp_path / "out.pt"),
            "--input-shape", "4,12"]
    assert CliRunner().invoke(main, args).exit_code == 0
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "pass --force" in again.stderr
    (tmp_path / "out.pt").unlink()
    manifest_only = CliRunner().invoke(main, args)
    assert manifest_only.exit_code == 2 and "manifest exists" in manifest_only.stderr
    assert CliRunner().invoke(main, [*args, "--force"]).exit_code == 0


NOISY_MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    class Noisy(nn.Module):
        """Adds fresh noise on every call, so no two runs agree: the self-check must refuse it."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + torch.rand(1).item()
''')


def test_cli_failed_self_check_exits_1_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bnstrip.arch import import_arch

    (tmp_path / "noisy_models_cli.py").write_text(NOISY_MODULE)
    monkeypatch.chdir(tmp_path)  # MODULE is found in the current directory, as on the command line
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        torch.save(import_arch("noisy_models_cli:Noisy").state_dict(), tmp_path / "in.pt")
        result = CliRunner().invoke(main, ["fuse", "--arch", "noisy_models_cli:Noisy", "in.pt", "out.pt",
                                           "--input-shape", "2,3,4,4"])
    finally:
        sys.modules.pop("noisy_models_cli", None)
    assert result.exit_code == 1, result.output
    assert "differs from the original" in result.stderr and "not writing out.pt" in result.stderr
    assert not (tmp_path / "out.pt").exists() and not manifest_path(tmp_path / "out.pt").exists()


# --------------------------------------------------------------------------- smallNet through the pipeline


def test_swapped_smallnet_arguments_are_named_before_the_output_is_checked(random_smallnet_state, tmp_path: Path) -> None:
    from bnstrip.core.foldmath import fold_state_dict
    from bnstrip.homework.models import SMALLNET_PAIRS

    folded = tmp_path / "smallNetTest.pt"
    torch.save(fold_state_dict(random_smallnet_state, list(SMALLNET_PAIRS), 1e-5), folded)
    existing = tmp_path / "smallNetSaved"
    existing.write_bytes(b"not to be touched")
    result = CliRunner().invoke(main, ["fuse", str(folded), str(existing)])
    assert result.exit_code == 2 and "swapped" in result.stderr and "pass --force" not in result.stderr
    assert existing.read_bytes() == b"not to be touched"


@pytest.mark.slow
def test_dtype_option_converts_and_says_what_was_written(random_smallnet_state, tmp_path: Path) -> None:
    source = tmp_path / "half.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in random_smallnet_state.items()}, source)
    as_float = CliRunner().invoke(main, ["fuse", str(source), str(tmp_path / "a.pt"), "--dtype", "float32", "--json"])
    assert as_float.exit_code == 0, as_float.output
    assert json.loads(as_float.stdout)["dtype"] == "float32"
    assert torch.load(tmp_path / "a.pt", weights_only=True)["fc1.0.weight"].dtype == torch.float32
    kept = CliRunner().invoke(main, ["fuse", str(source), str(tmp_path / "b.pt"), "--json"])
    assert kept.exit_code == 0, kept.output
    assert json.loads(kept.stdout)["dtype"] == "float16" and "--dtype float32" in kept.stderr
