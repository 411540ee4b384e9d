"""Bounds every reader applies to what an input claims, in one place (docs/safety.md states them)."""
from __future__ import annotations

MAX_TENSORS = 20_000
"""More tensors than any real checkpoint file holds (a 20,000-tensor file loads in about a second); each costs a
Python object and parsing, so a file declaring hundreds of thousands of empty ones is refused before any is built."""
