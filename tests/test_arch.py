"""import_arch: MODULE:CALLABLE from the current directory, and one clear InputError per way it can go wrong."""
from __future__ import annotations

import json
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from torch import nn

from bnstrip.arch import import_arch, parse_arch_spec
from bnstrip.errors import InputError

MODULE_TEXT = textwrap.dedent('''
    import torch
    from torch import nn

    class Small(nn.Module):
        def __init__(self, width: int = 4):
            super().__init__()
            self.fc = nn.Linear(width, 2)

        def forward(self, x):
            return self.fc(x)

    class NeedsArgs(nn.Module):
        def __init__(self, width):
            super().__init__()

    def factory():
        return Small(3)

    def not_a_module():
        return {"fc": 1}

    def explodes():
        raise RuntimeError("constructor exploded")

    class Zoo:
        @staticmethod
        def tiny():
            return Small(5)

    CONSTANT = 3
''')


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A uniquely named module in a fresh cwd that is *not* on sys.path (import_arch must add it)."""
    name = f"user_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MODULE_TEXT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    yield name
    sys.modules.pop(name, None)


def test_class_factory_and_dotted_attribute_build_modules(user_module: str) -> None:
    small = import_arch(f"{user_module}:Small")
    assert isinstance(small, nn.Module) and small.fc.in_features == 4  # default argument used
    assert import_arch(f"{user_module}:factory").fc.in_features == 3
    assert import_arch(f"{user_module}:Zoo.tiny").fc.in_features == 5


@pytest.mark.parametrize("spec, fragment", [
    ("no_colon_here", "expected MODULE:CALLABLE"),
    (":Small", "expected MODULE:CALLABLE"),
    ("mod:", "expected MODULE:CALLABLE"),
    ("models/net.py:Net", "dotted module name, not a file path; try --arch models.net:Net"),
])
def test_malformed_specs_are_refused_with_a_hint(spec: str, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        parse_arch_spec(spec)


def test_missing_module_names_the_search_path(user_module: str) -> None:
    with pytest.raises(InputError, match="module 'no_such_module_xyz' not found in the current directory"):
        import_arch("no_such_module_xyz:Net")


def test_module_with_missing_dependency_says_which(tmp_path: Path, user_module: str) -> None:
    (tmp_path / "needs_dep_mod.py").write_text("import surely_not_installed_pkg\n")
    try:
        with pytest.raises(InputError, match="needs module 'surely_not_installed_pkg', which is not installed"):
            import_arch("needs_dep_mod:Net")
    finally:
        sys.modules.pop("needs_dep_mod", None)


def test_module_that_raises_on_import(tmp_path: Path, user_module: str) -> None:
    (tmp_path / "broken_mod_at_import.py").write_text("raise ValueError('bad config')\n")
    try:
        with pytest.raises(InputError, match="importing 'broken_mod_at_import' raised ValueError: bad config"):
            import_arch("broken_mod_at_import:Net")
    finally:
        sys.modules.pop("broken_mod_at_import", None)


def test_missing_attribute_lists_what_is_there(user_module: str) -> None:
    with pytest.raises(InputError, match=r"has no attribute 'Nope'; callables it has: .*Small"):
        import_arch(f"{user_module}:Nope")


def test_not_callable(user_module: str) -> None:
    with pytest.raises(InputError, match="'CONSTANT' is a int, not a class or factory"):
        import_arch(f"{user_module}:CONSTANT")


def test_needs_arguments_names_them(user_module: str) -> None:
    with pytest.raises(InputError, match=r"NeedsArgs needs arguments \(width\); pass them with --arch-kwargs JSON"):
        import_arch(f"{user_module}:NeedsArgs")


def test_arch_kwargs_reach_the_factory(user_module: str) -> None:
    assert import_arch(f"{user_module}:NeedsArgs", {"width": 3}) is not None
    assert import_arch(f"{user_module}:Small", {"width": 7}).fc.in_features == 7
    with pytest.raises(InputError, match=r"calling Small\(\*\*\{'depth': 2\}\) raised TypeError"):
        import_arch(f"{user_module}:Small", {"depth": 2})


def test_constructor_error_is_one_line(user_module: str) -> None:
    with pytest.raises(InputError, match=r"calling explodes\(\) raised RuntimeError: constructor exploded"):
        import_arch(f"{user_module}:explodes")


def test_factory_not_returning_a_module(user_module: str) -> None:
    with pytest.raises(InputError, match=r"not_a_module\(\) returned a dict, not a torch.nn.Module"):
        import_arch(f"{user_module}:not_a_module")


def test_user_module_and_its_siblings_import_from_the_current_directory(tmp_path: Path, user_module: str) -> None:
    name = f"sibling_user_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}_helpers.py").write_text("WIDTH = 6\n")
    (tmp_path / f"{name}.py").write_text(f"from torch import nn\nimport {name}_helpers\n"
                                         f"def build():\n    return nn.Linear({name}_helpers.WIDTH, 2)\n")
    try:
        assert import_arch(f"{name}:build").in_features == 6
        assert str(tmp_path) not in sys.path, "the current directory stays off sys.path after the import"
    finally:
        for module in (name, f"{name}_helpers"):
            sys.modules.pop(module, None)


CANARY_SCRIPT = textwrap.dedent('''
    import importlib, importlib.util, json, os, sys
    sys.path.insert(0, "")  # what `python -m bnstrip` does
    before = {m: (importlib.util.find_spec(m) or None) is not None and
              os.path.dirname(os.path.abspath(importlib.util.find_spec(m).origin)) == os.getcwd()
              for m in ("gmpy2", "tabulate", "sympy")}
    from bnstrip.arch import import_arch
    model = import_arch("canary_user_model:Net")
    after = {}
    for m in ("gmpy2", "tabulate", "sympy"):  # what torch imports lazily, after --arch
        try:
            importlib.import_module(m)
        except ImportError:
            pass
    print(json.dumps({"before": before, "canaries": sorted(os.listdir("canaries")), "model": type(model).__name__}))
''')


def test_files_beside_the_checkpoint_do_not_shadow_torchs_lazy_imports(tmp_path: Path) -> None:
    """A gmpy2.py / sympy.py / tabulate.py in the current directory never runs; the user's MODULE does."""
    import subprocess

    (tmp_path / "canaries").mkdir()
    for module in ("gmpy2", "tabulate", "sympy"):
        (tmp_path / f"{module}.py").write_text(f"open('canaries/{module}', 'w').close()\n")
    (tmp_path / "canary_user_model.py").write_text(
        "import torch.fx\nfrom torch import nn\nclass Net(nn.Linear):\n    def __init__(self):\n        super().__init__(2, 2)\n")
    (tmp_path / "script.py").write_text(CANARY_SCRIPT)
    proc = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["before"]["gmpy2"] and report["before"]["tabulate"] or report["before"]["sympy"], \
        f"the canaries must be importable without the fix, or the test proves nothing: {report}"
    assert report["model"] == "Net"
    assert report["canaries"] == [], f"a file beside the checkpoint ran: {report['canaries']}"
