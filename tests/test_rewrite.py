"""bnstrip.fold.rewrite: the single-producer fast path rounds exactly as the float64 formula, and overflow is reported."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from bnstrip import fold_model
from bnstrip.errors import InputError
from bnstrip.testing.zoo import randomize_bn


def _conv_bn(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8))).eval().to(dtype)


def test_fold_is_the_float64_formula_rounded_once() -> None:
    model = _conv_bn()
    conv, bn = model[0], model[1]
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    want_w = (conv.weight.double() * scale.reshape(-1, 1, 1, 1)).float()
    want_b = (bn.bias.double() - bn.running_mean.double() * scale).float()
    result = fold_model(model, (torch.rand(2, 3, 8, 8),))
    assert torch.equal(result.model[0].weight, want_w)
    assert torch.equal(result.model[0].bias, want_b)
    assert torch.equal(model[0].weight, conv.weight) and model[0].bias is None  # the input is untouched


def test_overflow_raises_or_warns_with_the_layer_name() -> None:
    model = _conv_bn(torch.float16)
    with torch.no_grad():
        model[0].weight.fill_(60000.0)
        model[1].running_var.fill_(1e-3)
    with pytest.raises(InputError, match=r"^0: folded weight overflows float16"):
        fold_model(model)
    result = fold_model(model, allow_overflow=True)
    assert any("0: folded weight overflows float16" in w for w in result.warnings)
    assert torch.isinf(result.model[0].weight).all()


def test_checks_do_not_import_dynamo() -> None:
    """The watched run and the float64 evaluation use dispatch modes that torch would wrap in torch._dynamo.disable,
    importing torch._dynamo and sympy (about 75 MiB) for nothing."""
    code = ("import sys, torch\nfrom torch import nn\nfrom bnstrip import fold_model\n"
            "m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()\n"
            "assert fold_model(m, (torch.rand(1, 3, 6, 6),)).check.passed\n"
            "print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
