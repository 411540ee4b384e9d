"""The CLI through Click's CliRunner (and a subprocess for --help's imports): outputs, JSON, exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from bnstrip import __version__
from bnstrip.cli import main
from bnstrip.homework.models import SmallNetTest


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_does_not_import_torch() -> None:
    code = "import sys; from bnstrip.cli import main; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "bnstrip", "--help"], capture_output=True, text=True, check=True)
    assert "fuse" in out.stdout and "verify" in out.stdout


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_fuse_writes_strict_smallnettest_state_dict(random_smallnet_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "smallNetTest.pt"
    result = run("fuse", str(random_smallnet_file), str(out))
    assert result.exit_code == 0, result.output
    assert "conv1.0" in result.stdout and "self-check" in result.stdout
    state = torch.load(out, weights_only=True)
    SmallNetTest().load_state_dict(state, strict=True)


def test_fuse_json_and_safetensors_metadata(random_smallnet_file: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    out = tmp_path / "folded.safetensors"
    result = run("fuse", str(random_smallnet_file), str(out), "--json")
    assert result.exit_code == 0
    payload = json.loads(result.stdout)
    assert payload["pairs"] == [{"producer": "conv1.0", "bn": "conv1.1"}, {"producer": "conv2.0", "bn": "conv2.1"},
                                {"producer": "fc1.0", "bn": "fc1.1"}]
    assert payload["self_check_max_abs_diff"] < payload["self_check_tolerance"]
    assert {"input", "output", "seconds"} <= set(payload)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(SmallNetTest().state_dict())
    from bnstrip.io.checkpoint import sha256_file

    assert meta["source_sha256"] == sha256_file(random_smallnet_file)
    assert meta["bnstrip_version"] == __version__
    assert "fc1.0+fc1.1" in meta["folded_pairs"]


def test_fuse_refuses_existing_output_and_the_input(random_smallnet_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "exists.pt"
    out.write_bytes(b"keep me")
    result = run("fuse", str(random_smallnet_file), str(out))
    assert result.exit_code == 2 and "--force" in result.stderr and out.read_bytes() == b"keep me"
    result = run("fuse", str(random_smallnet_file), str(random_smallnet_file), "--force")
    assert result.exit_code == 2 and "input" in result.stderr
    assert run("fuse", str(random_smallnet_file), str(out), "--force").exit_code == 0


def test_fuse_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "notes.pt"
    bad.write_text("hello")
    result = run("fuse", str(bad), str(tmp_path / "o.pt"))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and str(bad) in result.stderr
    assert not (tmp_path / "o.pt").exists()


def test_verify_in_memory_and_from_fused_file(random_smallnet_file: Path, tmp_path: Path, fake_cifar_dir: Path) -> None:
    fused = tmp_path / "fused.pt"
    assert run("fuse", str(random_smallnet_file), str(fused)).exit_code == 0
    for extra in ([], ["--fused", str(fused)]):
        result = run("verify", "--checkpoint", str(random_smallnet_file), "--data-dir", str(fake_cifar_dir),
                     "--tolerance", "1e-4", "--json", *extra)
        assert result.exit_code == 0, result.stderr
        payload = json.loads(result.stdout)
        for key in ("max_batch_sq_norm", "max_abs_diff", "agreement", "accuracy_bn", "accuracy_folded", "images",
                    "batch_size", "tolerance", "passed", "seconds"):
            assert key in payload
        assert payload["images"] == 200 and payload["passed"] is True and payload["batch_size"] == 100


def test_verify_fails_with_exit_1_when_outputs_differ(random_smallnet_file: Path, tmp_path: Path,
                                                      fake_cifar_dir: Path) -> None:
    fused = tmp_path / "fused.pt"
    assert run("fuse", str(random_smallnet_file), str(fused)).exit_code == 0
    state = torch.load(fused, weights_only=True)
    state["fc2.0.bias"] += 0.5
    tampered = tmp_path / "tampered.pt"
    torch.save(state, tampered)
    result = run("verify", "--checkpoint", str(random_smallnet_file), "--fused", str(tampered),
                 "--data-dir", str(fake_cifar_dir), "--limit", "100")
    assert result.exit_code == 1
    assert "FAIL" in result.stdout


def test_verify_table_and_bad_usage(random_smallnet_file: Path, fake_cifar_dir: Path, tmp_path: Path) -> None:
    result = run("verify", "--checkpoint", str(random_smallnet_file), "--data-dir", str(fake_cifar_dir),
                 "--tolerance", "1e-4", "--batch-size", "50")
    assert result.exit_code == 0 and "max over batches" in result.stdout and "PASS" in result.stdout
    assert run("verify", "--batch-size", "0").exit_code == 2
    missing = run("verify", "--checkpoint", str(tmp_path / "nope.pt"), "--data-dir", str(fake_cifar_dir))
    assert missing.exit_code == 2 and "nope.pt" in missing.stderr


def test_verify_fused_with_wrong_keys(random_smallnet_file: Path, fake_cifar_dir: Path) -> None:
    result = run("verify", "--checkpoint", str(random_smallnet_file), "--fused", str(random_smallnet_file),
                 "--data-dir", str(fake_cifar_dir))
    assert result.exit_code == 2 and "not a smallNetTest state_dict" in result.stderr


def test_verify_without_data_offline_says_where_it_looked(random_smallnet_file: Path, tmp_path: Path,
                                                          monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BNSTRIP_DATA_DIR", raising=False)
    result = run("verify", "--checkpoint", str(random_smallnet_file), "--no-download")
    assert result.exit_code == 2
    assert "BNSTRIP_DATA_DIR" in result.stderr and "cache" in result.stderr


def test_python_dash_m_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "bnstrip", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout
