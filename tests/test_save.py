"""FoldResult.save + load_folded: the library round trip, reloaded in a fresh process against the original model."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bnstrip import fold_model, load_folded
from bnstrip.testing import zoo
from bnstrip.errors import InputError
from bnstrip.io.manifest import manifest_path

ROOT = Path(__file__).resolve().parents[1]

RELOAD = textwrap.dedent("""
    import sys, torch, bnstrip
    from bnstrip.testing import zoo
    path, name, inputs, expected = sys.argv[1:5]
    model = bnstrip.load_folded(path, getattr(zoo, name))         # the class, in a process that never folded
    with torch.no_grad():
        got = model(torch.load(inputs, weights_only=True))
    want = torch.load(expected, weights_only=True)
    bn_left = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    print(float((got - want).abs().max()), float(want.abs().max()), bn_left)
""")


@pytest.mark.parametrize("name, suffix", [("MLPBothSides", ".pt"), ("SubclassNet", ".safetensors")])
def test_save_then_load_folded_in_a_fresh_process_matches_the_original(tmp_path: Path, name: str,
                                                                       suffix: str) -> None:
    model, x = zoo.build(name)
    result = fold_model(model, (x,))
    out = tmp_path / f"folded{suffix}"
    assert result.save(out) == manifest_path(out)
    with torch.no_grad():
        torch.save(model(x), tmp_path / "expected.pt")  # the BN model is the ground truth
    torch.save(x, tmp_path / "x.pt")
    done = subprocess.run([sys.executable, "-c", RELOAD, str(out), name, str(tmp_path / "x.pt"),
                           str(tmp_path / "expected.pt")], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    diff, scale, bn_left = done.stdout.split()
    assert float(diff) <= 1e-5 * max(1.0, float(scale))
    assert int(bn_left) == len(result.skipped)  # the folded BatchNorms are gone from the rebuilt model


def test_load_folded_takes_a_factory_or_an_instance_either_way_round(tmp_path: Path) -> None:
    model, x = zoo.build("MLPBothSides")
    result = fold_model(model, (x,))
    result.save(tmp_path / "f.pt")
    want = result.model(x)
    for rebuilt in (load_folded(tmp_path / "f.pt", zoo.MLPBothSides), load_folded(str(tmp_path / "f.pt"),
                                                                                   lambda: zoo.MLPBothSides()),
                    load_folded(zoo.MLPBothSides(), tmp_path / "f.pt")):
        assert torch.equal(rebuilt(x), want)


def test_strict_false_into_the_original_class_is_wrong_and_load_folded_says_what_to_do(tmp_path: Path) -> None:
    """The pitfall the README warns about: a folded state_dict without its manifest."""
    model, x = zoo.build("MLPBothSides")
    result = fold_model(model, (x,))
    torch.save(result.model.state_dict(), tmp_path / "bare.pt")
    naive = zoo.MLPBothSides().eval()
    naive.load_state_dict(torch.load(tmp_path / "bare.pt", weights_only=True), strict=False)
    assert not torch.allclose(naive(x), model(x), atol=1e-3)  # silently a different model
    with pytest.raises(InputError, match=r"bare\.pt: no manifest .*strict=False.*result\.save\(PATH\)"):
        load_folded(tmp_path / "bare.pt", zoo.MLPBothSides)


def test_save_refuses_an_unchecked_result_and_an_existing_file(tmp_path: Path) -> None:
    model, x = zoo.build("MLPBothSides")
    with pytest.raises(InputError, match="without example_inputs"):
        fold_model(model).save(tmp_path / "a.pt")
    assert not (tmp_path / "a.pt").exists()
    result = fold_model(model, (x,))
    result.save(tmp_path / "a.pt")
    with pytest.raises(InputError, match="exists; pass force=True"):
        result.save(tmp_path / "a.pt")
    result.save(tmp_path / "a.pt", force=True)
    manifest = json.loads(manifest_path(tmp_path / "a.pt").read_text())
    assert manifest["folded"] and manifest["self_check"]["max_abs_diff"] <= manifest["self_check"]["tolerance"]
