"""The CLI through Click's CliRunner (and a subprocess for --help's imports): outputs, JSON, exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
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


def test_verify_in_memory_and_from_fused_file(random_smallnet_state, random_smallnet_file: Path, tmp_path: Path,
                                              fake_cifar_dir: Path) -> None:
    fused = _folded_file(random_smallnet_state, tmp_path / "fused.pt")  # what fuse writes (fuse has its own tests)
    for extra in ([], ["--fused", str(fused)]):
        result = run("verify", "--checkpoint", str(random_smallnet_file), "--data-dir", str(fake_cifar_dir),
                     "--tolerance", "1e-4", "--json", *extra)
        assert result.exit_code == 0, result.stderr
        payload = json.loads(result.stdout)
        for key in ("max_batch_sq_norm", "max_abs_diff", "agreement", "accuracy_bn", "accuracy_folded", "images",
                    "batch_size", "tolerance", "passed", "seconds"):
            assert key in payload
        assert payload["images"] == 200 and payload["passed"] is True and payload["batch_size"] == 100


def test_verify_fails_with_exit_1_when_outputs_differ(random_smallnet_state, random_smallnet_file: Path, tmp_path: Path,
                                                      fake_cifar_dir: Path) -> None:
    fused = _folded_file(random_smallnet_state, tmp_path / "fused.pt")
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
                 "--tolerance", "1e-4", "--batch-size", "50", "--limit", "100")
    assert result.exit_code == 0 and "max over batches" in result.stdout and "PASS" in result.stdout
    assert run("verify", "--batch-size", "0").exit_code == 2
    missing = run("verify", "--checkpoint", str(tmp_path / "nope.pt"), "--data-dir", str(fake_cifar_dir))
    assert missing.exit_code == 2 and "nope.pt" in missing.stderr


def test_verify_fused_with_wrong_keys(random_smallnet_file: Path, fake_cifar_dir: Path) -> None:
    result = run("verify", "--checkpoint", str(random_smallnet_file), "--fused", str(random_smallnet_file),
                 "--data-dir", str(fake_cifar_dir))
    assert result.exit_code == 2 and "not a smallNetTest state_dict" in result.stderr


@pytest.mark.slow
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


# --------------------------------------------------------------------------- issue 12: a newcomer's first hour

CORE_KEYS = {"command", "passed", "seconds", "bnstrip_version", "torch_version"}


def _folded_file(state, path: Path, dtype=torch.float32) -> Path:
    """A smallNetTest file folded independently of the CLI (core maths only), in `dtype`."""
    from bnstrip.core.foldmath import fold_state_dict
    from bnstrip.homework.models import SMALLNET_EPS, SMALLNET_PAIRS

    folded = fold_state_dict(state, list(SMALLNET_PAIRS), SMALLNET_EPS)
    torch.save({k: v.to(dtype) if v.is_floating_point() else v for k, v in folded.items()}, path)
    return path


def _piped(*args: str) -> subprocess.CompletedProcess:
    """The CLI as a user runs it with stdout piped into another program (not a terminal)."""
    return subprocess.run([sys.executable, "-m", "bnstrip", *args], capture_output=True, text=True,
                          env={**__import__("os").environ, "COLUMNS": "80"})


def test_piped_output_is_not_wrapped_at_80_columns() -> None:
    out = _piped("kl", "--dim", "9", "--seed", "1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(len(line) for line in lines) > 120
    formula = [line for line in lines if line.startswith("KL = 1/2")]
    assert formula and formula[0].rstrip().endswith("log(det S1 / det S0))")  # the formula is one line
    cov_rows = [line for line in lines if "cov0" in line]
    assert cov_rows and cov_rows[0].count("[") == cov_rows[0].count("]") == 1  # a matrix row is not split
    title = [line for line in lines if line.startswith("KL divergence, d = 9")]
    assert title and "seed 1" in title[0]  # a table title stays on one line


def test_every_command_json_has_the_core_keys(tmp_path: Path, random_smallnet_state, random_smallnet_file: Path,
                                               fake_cifar_dir: Path) -> None:
    fused = _folded_file(random_smallnet_state, tmp_path / "folded.pt")
    runs = {
        "kl": run("kl", "--samples", "2000", "--json"),
        "density": run("density", "--points", "50", "--json"),
        "conv-grad": run("conv-grad", "--json"),
        "init-stats": run("init-stats", "--layers", "2,1", "--samples", "2000", "--json"),
        "verify": run("verify", str(random_smallnet_file), str(fused), "--data-dir", str(fake_cifar_dir),
                      "--tolerance", "1e-4", "--limit", "100", "--json"),
    }
    for command, result in runs.items():
        assert result.exit_code == 0, (command, result.stderr)
        payload = json.loads(result.stdout)
        assert CORE_KEYS <= set(payload), (command, sorted(payload))
        assert payload["command"] == command and payload["passed"] is True
        assert payload["bnstrip_version"] == __version__ and payload["torch_version"] == torch.__version__
        assert isinstance(payload["seconds"], float) and payload["seconds"] >= 0
    verify = json.loads(runs["verify"].stdout)
    batch = fake_cifar_dir / "cifar-10-batches-py" / "test_batch"
    import hashlib

    from bnstrip.homework.verify import available_cores

    assert verify["data_md5"] == hashlib.md5(batch.read_bytes()).hexdigest() and verify["threads"] == available_cores()


def test_verify_takes_the_two_files_as_positionals(tmp_path: Path, random_smallnet_state, random_smallnet_file: Path,
                                                   fake_cifar_dir: Path) -> None:
    fused = _folded_file(random_smallnet_state, tmp_path / "folded.pt")
    by_flag = run("verify", "--checkpoint", str(random_smallnet_file), "--fused", str(fused), "--data-dir",
                  str(fake_cifar_dir), "--tolerance", "1e-4", "--limit", "100", "--json")
    by_position = run("verify", str(random_smallnet_file), str(fused), "--data-dir", str(fake_cifar_dir),
                      "--tolerance", "1e-4", "--limit", "100", "--json")
    assert by_flag.exit_code == by_position.exit_code == 0
    a, b = json.loads(by_flag.stdout), json.loads(by_position.stdout)
    assert a["fused"] == b["fused"] == str(fused) and a["max_batch_sq_norm"] == b["max_batch_sq_norm"]
    both = run("verify", str(random_smallnet_file), "--checkpoint", str(random_smallnet_file))
    assert both.exit_code == 2 and "not both" in both.stderr


def test_verify_fused_given_the_bn_checkpoint_says_where_it_belongs(random_smallnet_file: Path,
                                                                     fake_cifar_dir: Path) -> None:
    result = run("verify", "--fused", str(random_smallnet_file), "--checkpoint", str(random_smallnet_file),
                 "--data-dir", str(fake_cifar_dir))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "BatchNorm checkpoint" in result.stderr and "--checkpoint" in result.stderr


@pytest.mark.slow
def test_verify_failure_on_float16_says_the_bar_is_float32(tmp_path: Path, random_smallnet_state,
                                                           random_smallnet_file: Path, fake_cifar_dir: Path) -> None:
    half = _folded_file(random_smallnet_state, tmp_path / "half.pt", torch.float16)
    result = run("verify", str(random_smallnet_file), str(half), "--data-dir", str(fake_cifar_dir), "--limit", "100")
    assert result.exit_code == 1 and "FAIL" in result.stdout
    assert result.stderr.count("\n") == 1
    assert "float16" in result.stderr and "float32 bar" in result.stderr and "bnstrip fuse --dtype float32" in result.stderr
    single = _folded_file(random_smallnet_state, tmp_path / "single.pt")
    tampered = torch.load(single, weights_only=True)
    tampered["fc2.0.bias"] += 0.5
    torch.save(tampered, single)
    plain = run("verify", str(random_smallnet_file), str(single), "--data-dir", str(fake_cifar_dir), "--limit", "100")
    assert plain.exit_code == 1 and "float32 bar" not in plain.stderr  # a float32 failure is a real difference


def test_verify_explicit_data_dir_without_data_is_an_error(tmp_path: Path, random_smallnet_state,
                                                           random_smallnet_file: Path, fake_cifar_dir: Path,
                                                           monkeypatch) -> None:
    monkeypatch.setenv("BNSTRIP_DATA_DIR", str(fake_cifar_dir))
    fused = _folded_file(random_smallnet_state, tmp_path / "folded.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("verify", str(random_smallnet_file), str(fused), "--data-dir", str(empty))
    assert result.exit_code == 2 and str(empty) in result.stderr and "--data-dir DIR" in result.stderr
    assert result.stdout == ""


def test_verify_offline_one_line_with_url_size_and_recipe(tmp_path: Path, random_smallnet_state,
                                                          random_smallnet_file: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BNSTRIP_DATA_DIR", raising=False)

    def offline(url, timeout=None):
        raise OSError("Network is unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    fused = _folded_file(random_smallnet_state, tmp_path / "folded.pt")
    result = run("verify", str(random_smallnet_file), str(fused))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    for needle in ("cifar-10-python.tar.gz", "163 MB", "curl -LO", "--data-dir DIR", "Network is unreachable"):
        assert needle in result.stderr, needle
    assert result.stderr.count("not found") == 1
    assert "downloading" not in result.stderr  # no progress bar for a download that never started
    assert not (tmp_path / "cache").exists()


def test_library_api_names_become_flags_in_cli_errors() -> None:
    from bnstrip.cli.common import API_TO_FLAG, to_flags

    assert API_TO_FLAG["allow_overflow=True"] == "--allow-overflow"
    assert API_TO_FLAG["example_inputs"] == "--input-shape"
    text = "x: overflows float16; pass allow_overflow=True or give example_inputs of the right shape (data_dir=DIR)"
    assert to_flags(text) == ("x: overflows float16; pass --allow-overflow or give --input-shape of the right shape "
                              "(--data-dir DIR)")
    assert to_flags("/home/me/my_example_inputs.pt") == "/home/me/my_example_inputs.pt"


def test_progress_is_silent_until_work_reports_and_prints_time_left_when_piped(capsys) -> None:
    from bnstrip.cli.common import Progress

    with Progress("downloading") as progress:
        pass
    assert not progress.shown and capsys.readouterr().err == ""
    with Progress("Monte Carlo", after=0.0, every=0.0) as progress:
        __import__("time").sleep(0.01)
        progress(25, 100)
    err = capsys.readouterr().err
    assert "Monte Carlo: 25/100 (25%)" in err and "s left" in err


def test_shell_completion_lists_commands() -> None:
    import os

    script = Path(sys.executable).with_name("bnstrip")  # the installed entry point, as a shell would run it
    out = subprocess.run([str(script)], capture_output=True, text=True,
                         env={**os.environ, "_BNSTRIP_COMPLETE": "bash_complete", "COMP_WORDS": "bnstrip ve",
                              "COMP_CWORD": "1"})
    assert "verify" in out.stdout


def test_verify_looks_for_its_data_before_reading_any_model(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")  # loading it would fail: the data error must come first
    result = run("verify", str(garbage), "--data-dir", str(tmp_path / "nodata"))
    assert result.exit_code == 2 and "nodata" in result.stderr and "garbage" not in result.stderr
    missing = run("verify", str(tmp_path / "nope.pt"), "--data-dir", str(tmp_path / "nodata"))
    assert missing.exit_code == 2 and "nope.pt: no such file" in missing.stderr  # a missing file is named first
