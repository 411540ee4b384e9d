"""Bounds every reader applies to what an input claims, in one place (docs/safety.md states them)."""
from __future__ import annotations

MAX_TENSORS = 20_000
"""More tensors than any real checkpoint file holds (a 20,000-tensor file loads in about a second); each costs a
Python object and parsing, so a file declaring hundreds of thousands of empty ones is refused before any is built."""

MAX_ONNX_BYTES = (2 << 30) - 1
"""An .onnx file (and the external data it names, all together): protobuf itself cannot serialise more than 2 GiB."""
MAX_ONNX_NODES = 1_000_000
"""Nodes in one graph, counted on the wire before the model is parsed."""
MAX_ONNX_INITIALIZERS = 200_000
"""Initializers in one graph, counted on the wire before the model is parsed."""
MAX_TENSOR_RANK = 32
MAX_TENSOR_ELEMENTS = 1 << 31
"""Elements one tensor may declare: a dims field of 10^18 is refused before any buffer is sized from it."""
