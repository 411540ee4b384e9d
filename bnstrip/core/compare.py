"""The one comparator: does a folded model give the original's outputs? Used by every check in bnstrip.

Seeded inputs and seeded runs live here, and so does the one tolerance rule (issues 10 and 18):
"exact" is decided against a float64 evaluation of the original, o64, by what a fold is allowed
to change. With o = original(x) and f = folded(x), the fold passes when

    max|f - o64| <= max(ROUNDING_FACTOR * max|o - o64| + PERTURBATION_FACTOR * sensitivity,
                        floor * eps(dtype) * max(scale, 1))

Why: |f - o64| <= |f - f64| + |f64 - o64|, with f64 the folded model evaluated in float64. The
first term is the folded model's own arithmetic in its dtype, the same kind of arithmetic as the
original's, so of the order of the original's own rounding error |o - o64| (a factor of 4 leaves
room for one noisy maximum against another). The second is what the fold changed: each folded
parameter rounded once to its dtype. `sensitivity` measures exactly that: how far o64 moves when
the parameters the fold touches are moved one ulp each (`bnstrip.core.perturb`). It is 0 for
nothing and large only where the model itself is ill-conditioned (tiny running_var, huge gamma),
where any rounding of those parameters moves the outputs as much; a wrong fold (a wrong axis, a
lost shift, a wrong eps) moves them by the order of the outputs. The first term alone is 0 for a
float64 model (its own evaluation is the float64 one), which is why the second exists. The floor
is FLOOR_ULPS ulps of the outputs' scale in float32 and float64 (a float64 model's own arithmetic
has no other measure) and one ulp in float16 and bfloat16. The sensitivity costs two
float64 runs, so it is measured only for a fold that the rest of the rule does not already
accept. Where the model cannot run in float64 the two are compared in its own dtype with
`relative_tolerance(dtype)` times the scale.

The float64 evaluation widens one op's tensors at a time (see `float64_outputs`): no float64
copy of the whole model is ever held. It costs two to three forwards, and most folds do not need
it: a fold whose outputs are within IMPLIED_FRACTION of the floor from the original's in their own
dtype passes the rule whatever the original's own rounding error is (`implied_check`), so the
float64 evaluation runs only when that gap does not already decide.
"""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from bnstrip._torch import NoDynamoDispatchMode, op_schema, pytree
from bnstrip.errors import InputError

ROUNDING_FACTOR = 4.0
"""How many times the original's own rounding error the fold's error may be (see the module docstring)."""
PERTURBATION_FACTOR = 2.0
"""How many times the outputs' move under one ulp of the folded parameters the fold's change may be: one ulp is
twice the largest rounding, so this allows 4 times the largest rounding of every folded parameter at once."""
FLOOR_ULPS = 16.0
"""The smallest tolerance in float32 and float64, in units of eps times the output scale: a float64 model's own
rounding error against float64 is 0 by definition, and a float32 one's can be ~0 on some inputs."""
FLOOR_ULPS_HALF = 1.0
"""The smallest tolerance in float16 and bfloat16 (one ulp of the largest output): 16 ulps there would be 1.6% and
12.5% of the outputs, more than many wrong folds move them, and their own rounding error is never ~0."""
IMPLIED_FRACTION = 0.74
"""max|f - o| <= IMPLIED_FRACTION * floor * eps * max(max|o|, 1) passes the rule for every own rounding error a =
max|o - o64| (implied_check): |f - o64| <= |f - o| + a, which is at most 4a once a >= a third of that bound, and
below the floor (taken at max|o64| >= max|o| - a) otherwise. Exactly: a fraction up to 3 / (4 + floor * eps), 0.7485
for bfloat16 and 0.727 for float8_e4m3fn (implied_check takes the smaller); 0.74 covers float32 to bfloat16."""
_BLOCK_ELEMENTS = 1 << 18
"""Elements of a matrix operand widened to float64 at once (2 MB): a 16M-parameter Linear is never widened whole."""


@dataclass(frozen=True)
class SelfCheck:
    """The report of one comparison: the fold's error, the original's own rounding error and the tolerance.

    `max_abs_diff` is max|folded - original64| (max|folded - original| when `rounding` is None,
    i.e. the model could not run in float64); `output_scale` is max|original|.
    """

    max_abs_diff: float
    output_scale: float
    tolerance: float
    samples: int
    rounding: float | None = None
    sensitivity: float | None = None
    """How far one ulp of the folded parameters moves the float64 outputs (None: not measured)."""
    implied: bool = False
    """Passed on the gap in the model's own dtype, small enough to pass the float64 rule whatever the original's own
    rounding error (implied_check): no float64 evaluation was needed, so `rounding` is None."""

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        """Both figures, for a failure message: the fold's error and the original's own rounding error."""
        if self.implied:
            return (f"the folded outputs differ from the original's by {self.max_abs_diff:.3g} (at most "
                    f"{self.tolerance:.3g}, which passes against a float64 evaluation whatever the original's own rounding)")
        if self.rounding is None:
            return (f"the folded outputs differ from the original's by {self.max_abs_diff:.3g} "
                    f"(tolerance {self.tolerance:.3g}, compared in the model's dtype)")
        moved = "" if self.sensitivity is None else \
            f", and one ulp of the folded parameters moves it by {self.sensitivity:.3g}"
        return (f"the folded outputs are {self.max_abs_diff:.3g} from a float64 evaluation of the original, whose "
                f"own rounding error is {self.rounding:.3g}{moved} (tolerance {self.tolerance:.3g})")


def relative_tolerance(dtype: torch.dtype) -> float:
    """How far a fold may move outputs, relative to their scale, when no float64 evaluation is possible."""
    return 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2


def tolerance_for(dtype: torch.dtype, scale: float, rounding: float | None, sensitivity: float | None = None) -> float:
    """The one tolerance rule (see the module docstring)."""
    if rounding is None:
        return relative_tolerance(dtype) * max(scale, 1.0)
    allowed = ROUNDING_FACTOR * rounding + PERTURBATION_FACTOR * (sensitivity or 0.0)
    return max(allowed, _floor(dtype, scale))


def _floor(dtype: torch.dtype, scale: float) -> float:
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    floor = FLOOR_ULPS if eps <= torch.finfo(torch.float32).eps else FLOOR_ULPS_HALF
    return floor * eps * max(scale, 1.0)


def implied_check(original: Any, folded: Any, dtype: torch.dtype, samples: int = 1) -> SelfCheck | None:
    """A passing report from the outputs in the model's own dtype alone, where their gap already decides the rule
    (IMPLIED_FRACTION of the floor); None where only the float64 evaluation can decide (compare_outputs)."""
    measured = output_gap(original, folded)
    if measured is None or not math.isfinite(measured[0]):
        return None
    gap, scale = measured
    floor = _floor(dtype, scale)
    ulps = floor / max(scale, 1.0)  # floor multiplier * eps: the floor's own share of the scale's move
    bound = min(IMPLIED_FRACTION, 0.999 * 3.0 / (4.0 + ulps)) * floor  # 3 / (4 + ulps) is exact; float8 needs it
    if gap > bound:
        return None
    return SelfCheck(max_abs_diff=gap, output_scale=scale, tolerance=bound, samples=samples, implied=True)


MAX_EXAMPLE_ELEMENTS = 1 << 26
"""Largest seeded example input (64 Mi elements: 512 MiB in float64); far above any model's single input."""


def seeded_inputs(shape: Sequence[int], seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Uniform [0, 1) inputs (image-like) from a private generator, so checks are reproducible.

    The shape usually comes from a user (`--input-shape`), so its size is bounded before anything is
    allocated: the checks run the model several times, in float64 too, on this one tensor.
    """
    shape = [int(d) for d in shape]
    if not shape or any(d <= 0 for d in shape):
        raise InputError(f"example_inputs {tuple(shape)}: every dimension must be positive")
    elements = math.prod(shape)
    if elements > MAX_EXAMPLE_ELEMENTS:
        raise InputError(f"example_inputs {tuple(shape)} has {elements:,} elements (more than "
                         f"{MAX_EXAMPLE_ELEMENTS:,}); a batch of 1 at the model's usual input size is enough to trace "
                         "and check it")
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen, dtype=dtype)


def fresh_inputs(example_inputs: Sequence[Any]) -> list[Any]:
    """Copies of the example tensors for one run: a forward that works in place on its input must not change
    the caller's tensors, nor the inputs of the runs that follow."""
    return [pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, item) for item in example_inputs]


def seeded_outputs(model: nn.Module, inputs: Sequence[Any]) -> Any:
    """model(*inputs) with torch's and Python's generators seeded (and restored): random ops in a forward
    (noise, dropout-like code) draw the same numbers for the original and the folded model."""
    python_state = random.getstate()
    try:
        random.seed(0)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            return model(*fresh_inputs(inputs))
    finally:
        random.setstate(python_state)
def output_leaves(output: Any) -> tuple[Any, list[Any]]:
    """(structure, leaves) of a model output, looking into sequences, mappings, dataclasses and plain objects.

    Two outputs with equal structures can be compared leaf by leaf, whatever containers they use
    (fx's Interpreter returns its own immutable_list/immutable_dict; models return dataclasses).
    """
    leaves: list[Any] = []

    def walk(obj: Any, depth: int) -> Any:
        if isinstance(obj, torch.Tensor) or depth > 32:
            leaves.append(obj)
            return "leaf"
        if isinstance(obj, (list, tuple)):
            return ("seq", len(obj), tuple(walk(item, depth + 1) for item in obj))
        if isinstance(obj, dict):
            return ("map", tuple(map(repr, obj)), tuple(walk(item, depth + 1) for item in obj.values()))
        fields = getattr(obj, "__dict__", None)
        if isinstance(fields, dict) and not isinstance(obj, (type, nn.Module)) and not callable(obj):
            return ("obj", type(obj).__qualname__, tuple(fields), tuple(walk(v, depth + 1) for v in fields.values()))
        leaves.append(obj)
        return "leaf"

    structure = walk(output, 0)
    return structure, leaves


def outputs_match(expected: Any, got: Any) -> bool:
    """Same structure, same non-tensor leaves, and tensors equal up to float noise (the rule's floor for their dtype).

    Used where two runs do the same arithmetic (a traced graph against the forward it came from).
    """
    expected_spec, expected_leaves = output_leaves(expected)
    got_spec, got_leaves = output_leaves(got)
    if expected_spec != got_spec:
        return False
    for a, b in zip(expected_leaves, got_leaves, strict=True):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False
        if not isinstance(a, torch.Tensor):
            try:
                if not bool(a == b):
                    return False
            except Exception:
                return False
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.numel() == 0:
            continue
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return False
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        finite = torch.isfinite(a64)
        if not torch.equal(finite, torch.isfinite(b64)):
            return False
        if not torch.equal(a64[~finite].nan_to_num(), b64[~finite].nan_to_num()):
            return False
        if finite.any():
            scale = float(a64[finite].abs().max())
            if float((a64[finite] - b64[finite]).abs().max()) > tolerance_for(a.dtype, scale, 0.0):
                return False
    return True


def same_arguments(expected: Any, got: Any) -> bool:
    """The same structure, tensors equal element for element (dtype and shape too), other leaves equal."""
    expected_leaves, expected_spec = pytree.tree_flatten(expected)
    got_leaves, got_spec = pytree.tree_flatten(got)
    if expected_spec != got_spec:
        return False
    for a, b in zip(expected_leaves, got_leaves, strict=True):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                    and a.shape == b.shape and a.device == b.device and torch.equal(a, b)):
                return False
            continue
        try:
            if type(a) is not type(b) or not bool(a == b):
                return False
        except Exception:  # noqa: BLE001 - a leaf that cannot say whether it equals another is not the same
            return False
    return True


def output_gap(expected: Any, got: Any) -> tuple[float, float] | None:
    """(max |difference|, max |expected|) over all tensor outputs; None when the outputs differ in structure."""
    expected_spec, expected_leaves = output_leaves(expected)
    got_spec, got_leaves = output_leaves(got)
    if expected_spec != got_spec:
        return None
    gap, scale = 0.0, 0.0
    for a, b in zip(expected_leaves, got_leaves, strict=True):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        if a.shape != b.shape:
            return None
        if a.numel() == 0:
            continue
        a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
        same_nonfinite = torch.equal(torch.isfinite(a64), torch.isfinite(b64))
        finite = torch.isfinite(a64) & torch.isfinite(b64)
        if not same_nonfinite:
            return float("inf"), scale
        if finite.any():
            gap = max(gap, float((a64[finite] - b64[finite]).abs().max()))
            scale = max(scale, float(a64[finite].abs().max()))
    return gap, scale


def _widen(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.to(torch.float64)
    return value


def _blockwise_matmul(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """mm(x, w) / addmm(b, x, w) in float64, widening w a block of columns at a time (w is a Linear's weight.t())."""
    bias, x, w = (args[0], args[1], args[2]) if func is torch.ops.aten.addmm.default else (None, args[0], args[1])
    x = _widen(x)
    out = torch.empty(x.shape[0], w.shape[1], dtype=torch.float64, device=x.device)  # beside the model, not on the CPU
    step = max(1, _BLOCK_ELEMENTS // max(1, w.shape[0]))
    for start in range(0, w.shape[1], step):
        out[:, start:start + step] = torch.mm(x, w[:, start:start + step].to(torch.float64))
    if bias is not None:
        out.mul_(kwargs.get("alpha", 1)).add_(_widen(bias), alpha=kwargs.get("beta", 1))
    return out


_VIEWS: dict[Any, bool] = {}
"""func -> whether it returns a view (read from its schema once per op, not once per call)."""


def _is_view(func: Any) -> bool:
    known = _VIEWS.get(func)
    if known is None:
        schema = op_schema(func)
        known = _VIEWS[func] = schema is not None and not schema.is_mutable and any(
            r.alias_info is not None for r in schema.returns)
    return known


def _widen_operands(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """_widen on every operand: a flat pass for tensors, scalars and lists of them; pytree for deeper nesting."""
    values = (*args, *kwargs.values())
    if any(isinstance(v, dict) or (isinstance(v, (list, tuple)) and (type(v) not in (list, tuple) or any(
            isinstance(item, (list, tuple, dict)) for item in v))) for v in values):
        return pytree.tree_map(_widen, (args, kwargs))
    return tuple(_widen_flat(v) for v in args), {k: _widen_flat(v) for k, v in kwargs.items()}


def _widen_flat(value: Any) -> Any:
    """_widen on a value or on each item of a plain list/tuple (a conv's stride, cat's tensors) without pytree."""
    if type(value) in (list, tuple):
        return type(value)(_widen(item) for item in value)
    return _widen(value)


class _Float64Mode(NoDynamoDispatchMode):
    """Runs every op in float64, widening its floating-point operands for that op only.

    Views pass through unwidened (they share memory, the op that reads them widens them), and a
    large weight of a matrix product is widened a block of columns at a time, so the float64
    values of at most one layer (and usually a 2 MB block of it) exist at once.
    """

    _MATMUL = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in self._MATMUL and isinstance(args[-1], torch.Tensor) and args[-1].numel() > _BLOCK_ELEMENTS \
                and args[-1].dim() == 2 and args[-1].is_floating_point():
            return _blockwise_matmul(func, tuple(args), kwargs)
        if _is_view(func):
            return func(*args, **kwargs)
        args, kwargs = _widen_operands(args, kwargs)
        return func(*args, **kwargs)


def float64_outputs(model: nn.Module, inputs: Sequence[Any], *, writes_only_copies: bool = False) -> Any | None:
    """The model's outputs on `inputs` evaluated in float64 (seeded); None when it cannot run that way.

    No float64 copy of the model is made: `_Float64Mode` widens each op's operands as it runs, so an
    in-place op writes into a widened copy, never into a float32 (or narrower) tensor the model holds.
    writes_only_copies=True keeps to that way (no `_Float64FunctionMode` fallback, whose in-place
    methods write into their own operand): for a model whose parameters are shared with another's.
    """
    wide = [pytree.tree_map(_widen, item) for item in inputs]
    ways = ((_ConvOperandsMode, _Float64Mode),) if writes_only_copies else \
        ((_ConvOperandsMode, _Float64Mode), (_Float64FunctionMode,))
    for modes in ways:
        try:
            with contextlib.ExitStack() as stack:
                for mode in modes:
                    stack.enter_context(mode())
                return seeded_outputs(model, wide)
        except Exception:  # noqa: BLE001, PERF203 - a check in a composite op, hard-coded dtypes: next way
            continue
    return None


class _ConvOperandsMode(TorchFunctionMode):
    """Widens the operands of a convolution at torch's Python API, under `_Float64Mode`.

    torch's conv2d checks that input, weight and bias share a dtype before any aten op reaches a
    dispatch mode when the input is 1x1 (a conv head after global pooling, in most timm models);
    without this the whole `_Float64Mode` run failed at its last layer and ran again under
    `_Float64FunctionMode`. The convolution itself gets the float64 operands `_Float64Mode` would give it.
    """

    _CONVS = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"})

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self._CONVS:
            args, kwargs = _widen_operands(tuple(args), kwargs)
        return func(*args, **kwargs)


class _Float64FunctionMode(TorchFunctionMode):
    """The same widening one level up, at torch's Python API (F.conv2d, torch.cat, Tensor.add, ...).

    Some composite ops (conv2d on a 1x1 input, for one) check that input, weight and bias share a
    dtype before any aten op reaches a dispatch mode; here the operands are widened before those
    checks. An in-place method keeps its own first operand (widening it would write into a copy).
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and args:
            first, rest = args[0], pytree.tree_map(_widen, tuple(args[1:]))
            return func(first, *rest, **pytree.tree_map(_widen, kwargs))
        args, kwargs = pytree.tree_map(_widen, (tuple(args), kwargs))
        return func(*args, **kwargs)


def compare_outputs(original: Any, folded: Any, original64: Any | None, dtype: torch.dtype,
                    samples: int = 1, sensitivity: float | None = None) -> SelfCheck | None:
    """The rule of the module docstring on given outputs; None when their structures or shapes differ."""
    measured = output_gap(original, folded)
    if measured is None:
        return None
    rounding = None
    if original64 is not None:
        truth = output_gap(original64, folded)
        own = output_gap(original64, original)
        # A float32 original that overflows where float64 does not has an infinite "own rounding", which
        # would excuse any fold: then the fold is held to the own-dtype rule against the original instead.
        if truth is not None and own is not None and math.isfinite(own[0]):
            measured, rounding = truth, own[0]
    gap, scale = measured
    if rounding is None or not math.isfinite(sensitivity or 0.0):
        sensitivity = None  # a move of the outputs to infinity excuses nothing
    return SelfCheck(max_abs_diff=gap, output_scale=scale, tolerance=tolerance_for(dtype, scale, rounding, sensitivity),
                     samples=samples, rounding=rounding, sensitivity=sensitivity)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def compare_models(original: nn.Module, folded: nn.Module, inputs: Sequence[Any], *,
                   original_outputs: Any = None, original64: Any = None,
                   run: Callable[[nn.Module, Sequence[Any]], Any] = seeded_outputs,
                   sensitivity: float | None = None, evaluate64: Callable[[], Any] | None = None) -> SelfCheck | None:
    """Run what is not given yet (the original in its dtype, the folded model, the original in float64) and compare.

    Without `original64` the float64 evaluation runs only where the gap in the model's own dtype does not
    already decide (implied_check): `evaluate64()` where given, else float64_outputs(original, inputs).
    None when the folded model's outputs have another structure or shape than the original's.
    """
    if original_outputs is None:
        original_outputs = run(original, inputs)
    got = run(folded, inputs)
    first = inputs[0] if inputs else None
    samples = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1
    dtype = model_dtype(original)
    if original64 is None:
        implied = implied_check(original_outputs, got, dtype, samples)
        if implied is not None:
            return implied
        original64 = evaluate64() if evaluate64 is not None else float64_outputs(original, inputs)
    return compare_outputs(original_outputs, got, original64, dtype, samples, sensitivity)
