"""bnstrip.io.manifest: read back as untrusted input (regular file, size cap, nesting), paths checked like OUT."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bnstrip.errors import InputError
from bnstrip.io.manifest import MANIFEST_FORMAT, check_manifest_path, manifest_path, read_manifest, write_manifest


def payload() -> dict:
    return {"form": "modules", "folded": [{"layer": "conv", "bn": "bn", "into": "producer"}], "skipped": [],
            "gained_bias": ["conv"], "output_sha256": "0" * 64}


def test_written_manifest_reads_back(tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    path = write_manifest(out, payload())
    assert path == manifest_path(out) and read_manifest(out)["format"] == MANIFEST_FORMAT
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("text, fragment", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"format": "x"}', "not a bnstrip manifest"),
    ("\xff", "unreadable manifest"),
    (json.dumps({"format": MANIFEST_FORMAT, "version": 1, "form": "modules", "folded": "x", "skipped": [],
                 "gained_bias": []}), "no 'folded' list"),
])
def test_bad_manifests_are_one_line_errors(tmp_path: Path, text: str, fragment: str) -> None:
    out = tmp_path / "model.pt"
    manifest_path(out).write_bytes(text.encode("latin-1"))
    with pytest.raises(InputError) as info:
        read_manifest(out)
    assert fragment in str(info.value) and "\n" not in str(info.value) and str(manifest_path(out)) in str(info.value)


def test_manifest_path_checks_name_length_and_force(tmp_path: Path) -> None:
    long_out = tmp_path / ("m" * 250 + ".pt")  # OUT fits in 255 bytes; OUT.bnstrip.json does not
    with pytest.raises(InputError, match="255-byte limit"):
        check_manifest_path(long_out, [], force=True)
    out = tmp_path / "model.pt"
    manifest_path(out).write_text("{}")
    with pytest.raises(InputError, match="manifest exists; pass force=True"):
        check_manifest_path(out, [], force=False)
    assert check_manifest_path(out, [], force=True) == manifest_path(out)
    manifest_path(out).unlink()
    manifest_path(out).mkdir()
    with pytest.raises(InputError, match="is a directory"):
        read_manifest(out)


# --------------------------------------------------------------------------- tampered manifests (issue 17 item 7)


@pytest.fixture(scope="module")
def folded_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """LinearBNSequence (bn_head folded, bn_seq kept) fused with eps=1e-3 (the model's own is 1e-5) to .pt and
    .safetensors; the pristine bytes of each OUT and manifest, to restore between cases."""
    import torch

    from bnstrip.testing import zoo
    from bnstrip.core.compare import seeded_inputs
    from bnstrip.pipeline import fuse_file

    folder = tmp_path_factory.mktemp("folded")
    model, x = zoo.build("LinearBNSequence")
    torch.save(model.state_dict(), folder / "in.pt")
    outs = {}
    for suffix in (".pt", ".safetensors"):
        out = folder / f"out{suffix}"
        fuse_file(str(folder / "in.pt"), str(out), zoo.LinearBNSequence, seeded_inputs(list(x.shape)), eps=1e-3,
                  arch="bnstrip.testing.zoo:LinearBNSequence")
        outs[suffix] = (out, out.read_bytes(), manifest_path(out).read_bytes())
    return {"outs": outs, "x": x, "model": model}


def _tampered(folded_outputs: dict, suffix: str, tmp_path: Path, change) -> Path:
    _, data, manifest = folded_outputs["outs"][suffix]
    out = tmp_path / f"out{suffix}"
    out.write_bytes(data)
    document = json.loads(manifest)
    change(document)
    manifest_path(out).write_text(json.dumps(document))
    return out


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


TAMPERED = [
    ("eps 1e6", _set("eps", 1e6), "field 'eps' is 1000000.0"),
    ("eps NaN", _set("eps", float("nan")), "field 'eps' is nan"),
    ("eps 0", _set("eps", 0), "0 < eps <= 1"),
    ("eps true", _set("eps", True), "field 'eps' is True"),
    ("no sha256", lambda d: d.pop("output_sha256"), "field 'output_sha256' is missing"),
    ("folded not a BN", lambda d: d["folded"][0].__setitem__("bn", "head"), "field 'folded' names 'head', not a BatchNorm"),
    ("folded BN still held", lambda d: d["folded"].append({"layer": "proj", "bn": "bn_seq", "into": "producer"}),
     "says 'bn_seq' was folded away"),
    ("unprintable name", lambda d: d["gained_bias"].append("head\x1b[2J"), "not a module name"),
    ("gained bias absent", lambda d: d["gained_bias"].append("proj.missing"), "field 'gained_bias'"),
    ("duplicate", lambda d: d["folded"].append(dict(d["folded"][0])), "names a module twice"),
    ("bad into", lambda d: d["folded"][0].__setitem__("into", "elsewhere"), "not {layer, bn, into}"),
]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("name, change, fragment", TAMPERED, ids=[t[0] for t in TAMPERED])
def test_tampered_manifest_is_an_error_naming_the_field(folded_outputs: dict, tmp_path: Path, suffix: str, name: str,
                                                        change, fragment: str) -> None:
    from bnstrip import load_folded
    from bnstrip.testing import zoo

    out = _tampered(folded_outputs, suffix, tmp_path, change)
    with pytest.raises(InputError) as info:
        load_folded(zoo.LinearBNSequence(), out)
    text = str(info.value)
    assert fragment in text and "\n" not in text, text


def test_manifest_eps_is_applied_only_when_bound_to_the_checkpoint(folded_outputs: dict, tmp_path: Path) -> None:
    """0.5 is a valid eps, so the bound alone cannot catch it: it must agree with what OUT records (safetensors
    metadata, covered by OUT's sha256) or with the caller's eps= (a .pt cannot record it)."""
    import torch

    from bnstrip import load_folded
    from bnstrip.testing import zoo

    x = folded_outputs["x"]
    reference = folded_outputs["model"].eval()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.eps = 1e-3
        expected = reference(x)
    for suffix in (".pt", ".safetensors"):
        out = _tampered(folded_outputs, suffix, tmp_path, _set("eps", 0.5))
        with pytest.raises(InputError, match="field 'eps'"):
            load_folded(zoo.LinearBNSequence(), out)
    pristine = _tampered(folded_outputs, ".safetensors", tmp_path, lambda d: None)
    with torch.no_grad():  # the untouched safetensors manifest needs nothing more: OUT records eps 0.001
        assert torch.allclose(load_folded(zoo.LinearBNSequence(), pristine)(x), expected, rtol=1e-5, atol=1e-6)
    pt = _tampered(folded_outputs, ".pt", tmp_path, lambda d: None)
    with pytest.raises(InputError, match=r"pass eps=0.001"):
        load_folded(zoo.LinearBNSequence(), pt)
    with torch.no_grad():
        assert torch.allclose(load_folded(zoo.LinearBNSequence(), pt, eps=1e-3)(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="field 'eps' is 0.001, but eps=0.5 was passed"):
        load_folded(zoo.LinearBNSequence(), pt, eps=0.5)
