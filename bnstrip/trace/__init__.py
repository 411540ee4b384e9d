"""From a model to the data-flow graph the fold rules read (see docs/architecture.md).

classify (what a module is) -> a tracer (fx_tracer, export_tracer, partial) builds an
opgraph, checked against one real run (observe) and for memory hazards (alias);
build_graph picks the tracer.
"""
from __future__ import annotations

from bnstrip.trace.build import build_graph
from bnstrip.trace.opgraph import FunctionalBN, Op, OpGraph

__all__ = ["FunctionalBN", "Op", "OpGraph", "build_graph"]
