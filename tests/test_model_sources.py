"""--arch torchvision:NAME / timm:NAME / ultralytics:CONFIG.yaml and --arch-kwargs, with fake packages on sys.path.

The real libraries are never needed: each fake package records how it was called (weights=None,
pretrained=False, a yaml config), so the test shows what bnstrip asks of the real one.
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bnstrip import load_folded
from bnstrip.arch import arch_factory, import_arch
from bnstrip.cli import main
from bnstrip.errors import InputError
from bnstrip.io.manifest import manifest_path

FAKES = ("torchvision", "timm", "ultralytics", "fakenet")

FAKENET = textwrap.dedent("""
    import sys
    from torch import nn

    CALLS = []

    class Net(nn.Module):
        def __init__(self, num_classes=5):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, num_classes)

        def forward(self, x):
            return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))
""")

PACKAGES = {
    "torchvision/__init__.py": "",
    "torchvision/models/__init__.py": textwrap.dedent("""
        from fakenet import CALLS, Net
        def tinynet(*, weights="IMAGENET1K_V1", num_classes=5):
            CALLS.append(("torchvision", weights))
            return Net(num_classes)
        def list_models():
            return ["tinynet", "tinynet_wide"]
        def get_model_builder(name):
            return {"tinynet": tinynet}[name]
    """),
    "timm/__init__.py": textwrap.dedent("""
        from fakenet import CALLS, Net
        def is_model(name):
            return name == "tinynet"
        def list_models(pattern):
            return ["tinynet"]
        def create_model(name, pretrained=True, **kwargs):
            CALLS.append(("timm", pretrained))
            return Net(**kwargs)
    """),
    "ultralytics/__init__.py": textwrap.dedent("""
        from fakenet import CALLS, Net
        class DetectionModel(Net):
            def __init__(self, cfg, nc=None):
                print("model summary: 3 layers")    # ultralytics logs to stdout
                super().__init__(nc or 5)
                self.yaml = cfg
        class YOLO:
            def __init__(self, cfg):
                CALLS.append(("ultralytics", cfg))
                self.model = DetectionModel(cfg)
    """),
}


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The fake packages first on sys.path (any real one hidden for the test), and their call log."""
    root = tmp_path / "site"
    (root / "torchvision" / "models").mkdir(parents=True)
    (root / "timm").mkdir()
    (root / "ultralytics").mkdir()
    (root / "fakenet.py").write_text(FAKENET)
    for name, text in PACKAGES.items():
        (root / name).write_text(text)
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] in FAKES}
    monkeypatch.syspath_prepend(str(root))
    import fakenet

    yield fakenet.CALLS
    for name in [n for n in sys.modules if n.split(".")[0] in FAKES]:
        del sys.modules[name]
    sys.modules.update(saved)


@pytest.mark.parametrize("spec, call", [
    ("torchvision:tinynet", ("torchvision", None)),
    ("timm:tinynet", ("timm", False)),
    ("ultralytics:tiny.yaml", ("ultralytics", "tiny.yaml")),
])
def test_each_source_builds_without_weights_and_passes_kwargs(fakes: list, spec: str, call: tuple) -> None:
    assert import_arch(spec).fc.out_features == 5
    assert fakes == [call]  # weights=None / pretrained=False / built from the yaml: nothing to download
    kwargs = {"nc": 3} if spec.startswith("ultralytics") else {"num_classes": 3}
    assert arch_factory(spec, kwargs)().fc.out_features == 3


@pytest.mark.parametrize("spec, fragment", [
    ("torchvision:resnet999", "torchvision has no model 'resnet999'"),
    ("timm:nonet", "timm has no model 'nonet'"),
    ("ultralytics:yolov8n.pt", "built from their config, e.g. --arch ultralytics:yolov8n.yaml"),
    ("timm:", "name the model after 'timm:'"),
])
def test_unknown_names_are_one_clear_error(fakes: list, spec: str, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        arch_factory(spec)
    assert fakes == []


def test_a_missing_package_is_named_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ModuleNotFoundError, installed or not
    with pytest.raises(InputError, match=r"timm is not installed; install it \(pip install timm, or pip install "
                                         r"'bnstrip\[models\]'\)"):
        arch_factory("timm:resnet18")


def test_a_cuda_torchvision_beside_a_cpu_torch_names_the_matching_build(fakes: list, tmp_path: Path) -> None:
    (tmp_path / "site" / "torchvision" / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    with pytest.raises(InputError) as caught:
        arch_factory("torchvision:tinynet")
    message = str(caught.value)
    assert "importing torchvision failed because torchvision" in message and "does not match torch" in message
    assert "operator torchvision::nms does not exist" in message and "\n" not in message
    minor = int(torch.__version__.split(".")[1])
    assert f"pip install 'torchvision==0.{minor + 15}.*'" in message
    assert ("--index-url https://download.pytorch.org/whl/cpu" in message) == ("+cpu" in torch.__version__)


def test_a_library_that_fails_otherwise_is_named(fakes: list, tmp_path: Path) -> None:
    (tmp_path / "site" / "timm" / "__init__.py").write_text('raise ImportError("cannot import name \'x\'")\n')
    with pytest.raises(InputError, match=r"importing timm .* failed \(ImportError: cannot import name 'x'\); "
                                         r"reinstall timm"):
        arch_factory("timm:tinynet")


def _save(tmp_path: Path, model: torch.nn.Module) -> Path:
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    torch.save(model.state_dict(), tmp_path / "in.pt")
    return tmp_path / "in.pt"


@pytest.mark.parametrize("spec, kwargs", [("timm:tinynet", {"num_classes": 3}), ("ultralytics:tiny.yaml", {"nc": 3})])
def test_cli_fuse_by_name_with_kwargs_loads_back_and_matches(fakes: list, tmp_path: Path, spec: str,
                                                             kwargs: dict) -> None:
    factory = arch_factory(spec, kwargs)
    model = factory().eval()
    src = _save(tmp_path, model)
    out = tmp_path / "out.pt"
    result = CliRunner().invoke(main, ["fuse", "--arch", spec, "--arch-kwargs", json.dumps(kwargs), str(src),
                                       str(out), "--input-shape", "2,3,8,8", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)  # the library's own stdout print went to stderr
    assert payload["folded"] == [{"layer": "conv", "bn": "bn", "into": "producer"}] and manifest_path(out).is_file()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(load_folded(out, factory)(x), model(x), atol=1e-5)


@pytest.mark.parametrize("args, fragment", [
    (["--arch-kwargs", "{num_classes: 3}"], "--arch-kwargs '{num_classes: 3}': not JSON"),
    (["--arch-kwargs", "[3]"], "a JSON object of keyword arguments is needed, not a list"),
    (["--arch-kwargs", '{"depth": 3}'], "calling timm:tinynet(**{'depth': 3}) raised TypeError"),
])
def test_cli_bad_arch_kwargs_exit_2_with_one_line(fakes: list, tmp_path: Path, args: list, fragment: str) -> None:
    src = _save(tmp_path, import_arch("timm:tinynet"))
    result = CliRunner().invoke(main, ["fuse", "--arch", "timm:tinynet", *args, str(src), str(tmp_path / "o.pt"),
                                       "--input-shape", "2,3,8,8"])
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.pt").exists()


def test_cli_bench_takes_a_source_and_kwargs(fakes: list) -> None:
    result = CliRunner().invoke(main, ["bench", "--arch", "timm:tinynet", "--arch-kwargs", '{"num_classes": 3}',
                                       "--input-shape", "1,3,8,8", "--batch-size", "2", "--repeat", "1",
                                       "--warmup", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["folded"] == 1 and fakes == [("timm", False)]
