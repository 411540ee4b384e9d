"""build_graph: fx on the whole model, else torch.export, else fx per submodule."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from bnstrip.trace.export_tracer import graph_export
from bnstrip.trace.fx_tracer import graph_fx
from bnstrip.trace.opgraph import OpGraph, error_summary
from bnstrip.trace.partial import graph_partial

def build_graph(model: nn.Module, example_inputs: Sequence[torch.Tensor] | None) -> OpGraph:
    """fx on the whole model, else torch.export, else fx per submodule; the graph says which one worked."""
    graph, fx_error = graph_fx(model, example_inputs)
    if graph is not None:
        return graph
    if example_inputs is None:
        return OpGraph(ops=[], tracer="none", untraced={
            "": f"torch.fx cannot trace it ({error_summary(fx_error)}) and without example inputs torch.export cannot run; "
                "pass example inputs (example_inputs)"})
    graph, export_error = graph_export(model, example_inputs)
    if graph is not None:
        return graph
    partial = graph_partial(model, example_inputs)
    for prefix, reason in partial.untraced.items():
        partial.untraced[prefix] = f"torch.fx: {reason}; torch.export of the whole model: {error_summary(export_error)}"
    return partial
