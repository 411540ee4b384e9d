"""The zoo's models exported to ONNX with their BatchNorms kept, for tests and scripts/onnx_zoo.py (needs [onnx])."""
from __future__ import annotations

import io
from typing import Any


def export_zoo(name: str) -> Any:
    """A zoo model exported with its BatchNorms kept (TrainingMode.PRESERVE, no constant folding), as a ModelProto."""
    import onnx
    import torch

    from bnstrip.testing.zoo import build

    model, example = build(name)
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (example,), buffer, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=False, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())
