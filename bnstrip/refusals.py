"""Stable short codes for every refusal (why a BatchNorm was not folded, why branches were not merged).

A refusal stays a sentence for people; its code is for scripts and tests (`--json` shows both:
`{"bn": ..., "code": "BN_TRAINING", "reason": "it is in training mode ..."}`). The codes live in one
table, `CODES`, matched against the sentence's fixed wording (its variable parts, names and numbers,
never decide a code), so the sentences are built where the facts are and nothing else changes there.
A sentence that lists why no neighbour could absorb the BatchNorm ("not folded into the layer before:
...; nor into the layer after: ...") is NO_NEIGHBOUR, and `causes` gives the code of each part.
README.md's table is this table; tests/test_refusals.py checks each code against its example.
A leaf module: it imports nothing of bnstrip.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

OTHER = "OTHER"
"""A sentence no row matches: a new refusal without its row (tests/test_refusals.py keeps this from shipping)."""

NO_NEIGHBOUR = "NO_NEIGHBOUR"


@dataclass(frozen=True)
class Code:
    """One code: what it means and the fixed wording that marks it, with an example sentence."""

    code: str
    meaning: str
    pattern: str
    example: str


CODES: tuple[Code, ...] = (
    Code("BN_TRAINING", "the BatchNorm is in training mode", r"is in training mode",
         "it is in training mode (its .training is True) although the model is in eval mode"),
    Code("NO_RUNNING_STATS", "track_running_stats=False: it normalises with batch statistics", r"has no running statistics",
         "it has no running statistics (track_running_stats=False)"),
    Code("STATS_UNREADABLE", "its statistics cannot be read", r"statistics cannot be read", "its statistics cannot be read (KeyError: x)"),
    Code("STATS_NOT_FOLDABLE", "its statistics give no finite fold (zero or negative variance, inf, nan)",
         r"statistics cannot be folded", "its statistics cannot be folded: bn: running_var has 1 value <= 0"),
    Code("BN_NOT_PLAIN", "a BatchNorm subclass with its own forward, or not a BatchNorm", r"not a plain BatchNorm|is not a BatchNorm$",
         "MyBN overrides forward, so it is not a plain BatchNorm"),
    Code("HOOKS", "hooks that may change an output", r"hooks",
         "BatchNorm2d has hooks that may change its output"),
    Code("NOT_PLAIN_TENSOR", "a weight, bias or statistic that is not a plain Parameter or buffer",
         r"not a plain Parameter", "its weight is not a plain Parameter or buffer (parametrized?)"),
    Code("KEEP_STRUCTURE", "keep_structure=True cannot hold this fold", r"^keep_structure=True:|: keep_structure=True:",
         "keep_structure=True: its eps=2.0 is not in [0, 1), so it cannot become an exact identity"),
    Code("UNTRACEABLE", "the code around it cannot be traced", r"cannot be traced|cannot trace it",
         "it is called from the model's forward, which cannot be traced: x"),
    Code("NEVER_CALLED", "it never runs in the traced forward", r"never called", "it is never called in the traced forward"),
    Code("TORCHSCRIPT", "a TorchScript module", r"TorchScript", "it is a TorchScript module (torch.jit.script/trace)"),
    Code("UNDONE", "every rule allowed it, but the check found the outputs moved; the fold (or merge) was undone",
         r"was undone", "every rule allowed folding it, but then outputs moved; the fold was undone"),
    Code("READ_AT_RUN_TIME", "its tensors are read elsewhere at run time", r"at run time|tensors directly",
         "its running_mean is also read by head (op aten.add) at run time"),
    Code("CALL_COUNT", "called more than once, or not as often as the graph says",
         r"runs \d+ times on the example inputs|is called \d+ times|calls do not all come",
         "it is called 2 times, so folding would change every call"),
    Code("SHARED_MODULE", "one module registered under two names", r"the same module is registered as",
         "the same module is registered as a and b"),
    Code(NO_NEIGHBOUR, "no neighbour can absorb it (causes: the code of each neighbour's reason)", r"^not folded ",
         "not folded into the layer before: its input comes from relu, not directly from a Conv, ConvTranspose or Linear"),
    # why one neighbour cannot absorb it (the causes of NO_NEIGHBOUR), and why branches are not merged
    Code("IN_PLACE_WRITE", "its input is changed in place", r"changed in place|as out-of-place",
         "its input is also changed in place by .mul_(); without the BatchNorm, conv would read that same tensor"),
    Code("VALUE_SHARED", "a value it needs unnormalised also feeds another op", r"also feeds|also concatenates|more than once",
         "the output of conv also feeds add, which must keep the unnormalised values"),
    Code("ACT_AFTER", "the BatchNorm applies more after normalising", r"applies more after normalising",
         "BatchNormAct2d applies more after normalising, so it cannot move into a later layer"),
    Code("OWN_FORWARD", "the layer overrides forward and the fold cannot be proven for it", r"overrides forward",
         "its output goes to conv2 (Conv2dSame), which cannot absorb it (Conv2dSame overrides forward)"),
    Code("CHANNELS", "channel counts or the channel axis do not line up",
         r"channels but it has|takes \d+ channels|normalises dim|reach dim|concatenates along dim|channel dim|mixes the last dim|"
         r"channels, not",
         "conv produces 8 channels but it has 4"),
    Code("SHAPE_UNKNOWN", "shapes are needed: pass example inputs", r"unknown",
         "the layout of conv's output is unknown; pass example inputs (example_inputs)"),
    Code("PADDING", "zero padding or transposed-conv borders would see the shift", r"zero-pads|padding|border",
         "the next conv conv2 zero-pads (padding=1) and padded zeros never get the shift"),
    Code("NOT_A_LAYER", "the neighbour is not a Conv, ConvTranspose or Linear", r"not directly|not from a layer|not to a Linear|"
         r"not a Conv, ConvTranspose or Linear|not in the traced graph|output is unused|feeds \d+ ops|takes other inputs|"
         r"lazy module|not floating point|cannot absorb it",
         "its input comes from relu, not directly from a Conv, ConvTranspose or Linear"),
    Code("MERGE_SHAPE", "the branches do not fit one conv (kernel, stride, dtype, shapes, nonlinearity, convs in a row)",
         r"branch|d conv|dtypes|stride|kernel|broadcasts|two convs in a row|-D input",
         "the branch through relu is not linear in x: a nonlinearity sits inside it"),
)
"""Tried in order; the first row whose pattern is found in the sentence gives its code."""

_COMPILED = tuple((row.code, re.compile(row.pattern)) for row in CODES)
_PART = re.compile(r"^(?:not folded |nor )(?:into [^:]+|through [^:]+): ")


def refusal_code(reason: str) -> str:
    """The stable code of one refusal sentence (OTHER when no row matches)."""
    return next((code for code, pattern in _COMPILED if pattern.search(reason)), OTHER)


@dataclass(frozen=True)
class Refusal:
    """A refusal as scripts see it: its code, its sentence, and for NO_NEIGHBOUR the code of each neighbour's reason."""

    code: str
    reason: str
    causes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"code": self.code, "reason": self.reason}
        if self.causes:
            out["causes"] = list(self.causes)
        return out


def refusal(reason: str) -> Refusal:
    """`reason` with its code; a NO_NEIGHBOUR sentence also with the code of each '; nor ...' part."""
    code = refusal_code(reason)
    if code != NO_NEIGHBOUR:
        return Refusal(code, reason)
    parts = [_PART.sub("", part) for part in reason.split("; nor ")]
    return Refusal(code, reason, tuple(refusal_code(part) for part in parts))


def markdown_table() -> str:
    """README.md's table of codes (tests/test_refusals.py checks the README holds exactly this)."""
    rows = ["| code | meaning |", "| --- | --- |"] + [f"| `{row.code}` | {row.meaning} |" for row in CODES]
    return "\n".join(rows)
