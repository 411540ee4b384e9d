"""Coverage benchmark: fold every BatchNorm bnstrip can in real torchvision, timm and ultralytics models.

A benchmark, not a test (issue 10, "Measure it"): CI and the tests never import timm or
torchvision. Each model runs in its own niced subprocess with a timeout, so one hang or crash
costs one row. Per model it records the BatchNorm count, what bnstrip folded, what it refused
(grouped by a short reason category), fold time against torch.fx's fuser plus one forward
pass, and the float64 fold error: the model converted to float64, folded, and compared with the
float64 original (an exact fold gives ~1e-15; above 1e-9 relative is a wrong model); the float64
copy must fold as many BatchNorms as the float32 model (a difference is flagged in bold). Where
ultralytics is installed, `ult:NAME.yaml` models are built from their yaml and ultralytics' own
`fuse()` is measured beside torch.fx's fuser.

Setup (a separate venv; never in CI):

    python3 -m venv .zoo-venv && . .zoo-venv/bin/activate && pip install torch==2.13.0 \
      && pip install -e '.[zoo]' torch==2.13.0      # torchvision + timm, keeping that torch
    nice -n 10 python scripts/zoo.py --jobs 1 --out zoo.md --json zoo.json [--reparameterize]

--jobs 1 for the fold-time figures: models measured at once share the cores.

The registry's torchvision wheel is a CUDA build: beside the CPU torch its C extension fails to
load, and `import torchvision` (so `import timm`) then fails with "operator torchvision::nms
does not exist", because torchvision's Python side registers fake kernels for ops its C side
should have defined. `_register_torchvision_ops` defines those two schemas (copied from
torchvision/csrc/ops/nms.cpp and quantized nms) with torch.library first, so the model code
imports; calling nms would still fail, and no classification model calls it.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

# name: "tv:<torchvision builder>" or "timm:<timm name>", optionally "@<input size>".
DEFAULT_MODELS = [
    # torchvision
    "tv:resnet18", "tv:resnet50", "tv:resnext50_32x4d", "tv:wide_resnet50_2", "tv:densenet121",
    "tv:mobilenet_v2", "tv:mobilenet_v3_small", "tv:mobilenet_v3_large", "tv:efficientnet_b0",
    "tv:efficientnet_v2_s@192", "tv:regnet_x_400mf", "tv:regnet_y_400mf", "tv:mnasnet0_5",
    "tv:mnasnet1_0", "tv:shufflenet_v2_x0_5", "tv:shufflenet_v2_x1_0", "tv:squeezenet1_1",
    "tv:inception_v3@299", "tv:googlenet", "tv:vgg11_bn", "tv:convnext_tiny",
    # timm: ResNet family
    "timm:resnet18", "timm:resnet26d", "timm:resnet50d", "timm:seresnext26d_32x4d", "timm:ecaresnet26t",
    "timm:ecaresnetlight", "timm:skresnet18", "timm:res2net50_14w_8s@160", "timm:resnest14d",
    "timm:resnetv2_50", "timm:gcresnet33ts", "timm:resnet32ts", "timm:tresnet_m",
    # timm: EfficientNet / MobileNet family (BatchNormAct2d, Conv2dSame in tf_ variants)
    "timm:efficientnet_b0", "timm:tf_efficientnet_b0", "timm:tf_efficientnetv2_b0",
    "timm:efficientnet_lite0", "timm:tf_efficientnet_lite0", "timm:mobilenetv2_100",
    "timm:mobilenetv3_small_100", "timm:tf_mobilenetv3_small_100", "timm:mobilenetv3_large_100",
    "timm:mobilenetv4_conv_small", "timm:mixnet_s", "timm:tf_mixnet_s", "timm:mnasnet_100",
    "timm:semnasnet_100", "timm:spnasnet_100", "timm:fbnetc_100", "timm:fbnetv3_b",
    "timm:hardcorenas_a", "timm:lcnet_050", "timm:tinynet_e", "timm:ghostnet_100",
    "timm:ghostnetv2_100", "timm:rexnet_100", "timm:regnetx_002", "timm:regnety_002",
    "timm:regnetz_b16@224",
    # timm: other CNNs
    "timm:cspresnet50@160", "timm:cspdarknet53@160", "timm:cs3darknet_s", "timm:darknet17",
    "timm:dla34", "timm:dla46_c", "timm:dpn48b", "timm:densenet121", "timm:hrnet_w18_small",
    "timm:selecsls42b", "timm:vovnet39a@160", "timm:ese_vovnet19b_dw", "timm:gernet_s",
    "timm:repvgg_a0", "timm:mobileone_s0", "timm:repghostnet_050", "timm:xception41@160",
    "timm:inception_v3@299", "timm:nasnetalarge@160", "timm:pnasnet5large@160", "timm:hgnetv2_b0",
    "timm:convmixer_768_32@96", "timm:starnet_s1", "timm:repvit_m1",
    # timm: hybrids with BatchNorm
    "timm:levit_128s", "timm:levit_conv_128s", "timm:efficientformerv2_s0", "timm:efficientvit_b0",
    "timm:efficientvit_m0", "timm:mobilevit_xxs", "timm:mobilevitv2_050", "timm:fastvit_t8",
    "timm:botnet26t_256", "timm:halonet26t",
]

# Added to the default list where ultralytics is installed: built from their yaml (random init, no download),
# with ultralytics' own fuse() measured beside torch.fx's fuser.
ULTRALYTICS_MODELS = ["ult:yolov8n.yaml@320", "ult:yolo11n.yaml@320", "ult:yolov10s.yaml@320",
                      "ult:yolov8n-seg.yaml@320", "ult:rtdetr-l.yaml@320"]

TIMEOUT_S = 300


# --------------------------------------------------------------------------- worker (one model)


def _register_torchvision_ops() -> None:
    """Define torchvision's op schemas so the CUDA torchvision wheel imports beside CPU torch (see above)."""
    import torch

    global _TV_LIB
    try:
        torch.ops.torchvision.nms  # noqa: B018 - the C extension loaded after all
        return
    except (AttributeError, RuntimeError):
        pass
    _TV_LIB = torch.library.Library("torchvision", "DEF")
    _TV_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


_TV_LIB = None


def _build(spec: str) -> tuple[Any, int]:
    """The model (random init, eval) and its input size."""
    source, _, rest = spec.partition(":")
    name, _, size = rest.partition("@")
    if source == "tv":
        import torchvision

        kwargs = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        default = 299 if name == "inception_v3" else 224
    elif source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        default = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    elif source == "ult":  # ultralytics, built from its yaml (random init): "ult:yolov8n.yaml@320"
        import ultralytics

        model = (ultralytics.RTDETR if name.startswith("rtdetr") else ultralytics.YOLO)(name).model
        default = 640
    else:
        raise ValueError(f"{spec}: expected tv:NAME, timm:NAME or ult:NAME.yaml")
    return model.eval(), int(size) if size else default


def _convs(model: Any) -> int:
    import torch

    return sum(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())


def _ultralytics_fuse(model: Any, x: Any, out64: Any) -> tuple[float, int, float, int]:
    """ultralytics' own fuse() as a peer: its time, the BatchNorms it removed, its error against float64 and the
    convs left (it merges RepVGG-style branches too)."""
    fused = copy.deepcopy(model)
    before = sum(1 for m in fused.modules() if _is_bn(m))
    t0 = time.perf_counter()
    fused.fuse(verbose=False)
    seconds = time.perf_counter() - t0
    return seconds, before - sum(1 for m in fused.modules() if _is_bn(m)), _rel_err(fused(x), out64), _convs(fused)


def _is_bn(module: Any) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return isinstance(module, _BatchNorm) or "BatchNorm" in type(module).__name__


def _randomise_bn(model: Any, seed: int) -> None:
    """Non-trivial statistics so every fold moves the weights (seeded)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in model.named_modules():
            if not _is_bn(m):
                continue
            for attr, draw in (("running_mean", lambda n: torch.randn(n, generator=gen) * 0.5),
                               ("running_var", lambda n: torch.rand(n, generator=gen) * 1.5 + 0.5),
                               ("weight", lambda n: torch.rand(n, generator=gen) + 0.5),
                               ("bias", lambda n: torch.randn(n, generator=gen) * 0.5)):
                t = getattr(m, attr, None)
                if isinstance(t, torch.Tensor) and t.dim() == 1:
                    t.copy_(draw(t.numel()).to(t.dtype))


def _first_tensor(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)):
        return _first_tensor(out[0])
    if isinstance(out, dict):
        return _first_tensor(next(iter(out.values())))
    raise TypeError(f"no tensor in {type(out).__name__}")


def _rel_err(a: Any, b: Any) -> float:
    a, b = _first_tensor(a).double(), _first_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _fx_fuse(model: Any) -> tuple[float | None, int | None, str | None]:
    """Time and BN count of torch.fx's fuser, or why it could not trace."""
    import torch
    from torch.fx.experimental.optimization import fuse

    try:
        before = sum(1 for n in torch.fx.symbolic_trace(model).graph.nodes if n.op == "call_module" and
                     _is_bn(model.get_submodule(n.target)))
        t0 = time.perf_counter()
        fused = fuse(model)
        seconds = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - any trace failure is a result here
        return None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    after = sum(1 for n in fused.graph.nodes if n.op == "call_module" and _is_bn(fused.get_submodule(n.target)))
    return seconds, before - after, None


def worker(spec: str, seed: int, reparameterize: bool = False) -> dict[str, Any]:
    """Measure one model; returns the JSON-able row."""
    _register_torchvision_ops()
    import torch

    import bnstrip
    import bnstrip.fold  # noqa: F401 - imported before the timing, as torch.fx's fuser is in _fx_fuse

    torch.manual_seed(seed)
    model, size = _build(spec)
    _randomise_bn(model, seed)
    bns = [name for name, m in model.named_modules() if _is_bn(m)]
    row: dict[str, Any] = {"model": spec.split("@")[0], "input": size, "bn": len(bns),
                           "bn_classes": dict(Counter(type(model.get_submodule(n)).__name__ for n in bns))}
    if not bns:
        row["note"] = "no BatchNorm"
        return row
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        t0 = time.perf_counter()
        out32 = model(x)
        row["forward_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = bnstrip.fold_model(model, example_inputs=(x,), reparameterize=reparameterize)
        row["fold_s"] = time.perf_counter() - t0
        # BNs removed by merging parallel branches (issue 14) are counted apart from the folded pairs.
        row["merged_bns"] = sorted({bn for merge in getattr(result, "merged", []) for bn in merge.bns})
        row["merges"] = len(getattr(result, "merged", []))
        row["convs"] = [_convs(model), _convs(result.model)]
        row["tracer"] = result.tracer
        check = result.check  # how the proof was decided: the gap alone, or the float64 evaluation too
        row["proof"] = None if check is None else "gap" if check.implied else "float64" if check.rounding is not None \
            else "own dtype"
        row["folded"] = [list(p) for p in result.folded]
        row["skipped"] = [list(p) for p in result.skipped]
        row["fx_s"], row["fx_folded"], row["fx_error"] = _fx_fuse(model)
        # float64: the original's own float32 error, then a float64 fold of a float64 copy.
        model64 = copy.deepcopy(model).double()
        out64 = model64(x.double())
        row["orig32_err"] = _rel_err(out32, out64)
        row["folded32_err"] = _rel_err(result.model(x), out64)
        t0 = time.perf_counter()
        result64 = bnstrip.fold_model(model64, example_inputs=(x.double(),), reparameterize=reparameterize)
        row["fold64_s"] = time.perf_counter() - t0
        row["fold64_err"] = _rel_err(result64.model(x.double()), out64)
        row["folded64"] = [bn for _, bn in result64.folded]
        row["skipped64"] = [list(p) for p in result64.skipped]
        if spec.startswith("ult:"):
            row["ult_s"], row["ult_folded"], row["ult_err"], row["ult_convs"] = _ultralytics_fuse(model, x, out64)
    return row


# --------------------------------------------------------------------------- reason categories

# (category, regex on the reason); first match wins, most specific first. A reason is
# "not folded into the layer before: P; nor into the layer after: C"; P usually decides.
CATEGORIES = [
    ("undone after the self-check (float32 rounding)", r"the fold was undone"),
    ("BN module in training mode", r"training mode"),
    ("forward not traceable", r"cannot be traced|no longer traces"),
    ("never called in the traced forward", r"never called"),
    ("called more than once", r"is called \d+ times|runs \d+ times"),
    ("metadata read inside a BatchNorm subclass (BatchNormAct2d)", r"also feeds getattr inside .*BatchNorm"),
    ("metadata read (getattr/size/dim) elsewhere", r"also feeds (getattr|size|dim|_assert|\.size|\.dim)"),
    ("producer output also feeds an add", r"also feeds (add|\.add|iadd|\+)"),
    ("producer output also feeds another op", r"also feeds"),
    ("BatchNorm subclass with its own forward (torch.export path)", r"overrides forward, so it is not a plain"),
    ("BN after a cat that includes a block's input (DenseNet's pooled or earlier features, DPN's dense path), which "
     "cannot absorb its channels", r"also concatenates .* which cannot absorb its channels"),
    ("producer is a layer subclass with its own forward", r"cannot absorb it"),
    ("BN after cat", r"comes from (cat|torch\.cat|\.cat)"),
    ("BN after flatten/reshape (Linear on (B,N,C))", r"comes from \.?(flatten|reshape|view|permute|transpose)"),
    ("BN after a residual add", r"comes from (add|iadd|\.add)\b"),
    ("BN after a mean/pool", r"comes from \.?(mean|adaptive_avg_pool|avg_pool|max_pool|\S+ \(\w*Pool\w*\))"),
    ("BN after an Identity/Dropout", r"comes from \S+ \((Identity|Dropout\w*|DropPath|StochasticDepth)\)"),
    ("BN after an activation or other op", r"comes from"),
    ("other", r""),
]


def producer_part(reason: str) -> str:
    """The 'layer before' half of a reason (the half that usually decides)."""
    m = re.match(r"not folded into the layer before: (.*?); nor into the layer after: (.*)$", reason)
    return m.group(1) if m else reason


def consumer_part(reason: str) -> str:
    m = re.match(r"not folded into the layer before: (.*?); nor into the layer after: (.*)$", reason)
    return m.group(2) if m else ""


def category(reason: str) -> str:
    head = producer_part(reason)
    for name, pattern in CATEGORIES:
        if re.search(pattern, head):
            return name
    return "other"


def bn_module(name: str) -> str:
    """bnstrip names a BatchNorm subclass's inner F.batch_norm 'F.batch_norm@<module>.running_mean'."""
    m = re.match(r"F\.batch_norm@(.+)\.running_mean$", name)
    return m.group(1) if m else name


def refusals(row: dict[str, Any]) -> dict[str, list[str]]:
    """Each refused BatchNorm module once, with all its reasons (the first is the real one)."""
    folded = {bn_module(bn) for _, bn in row.get("folded", [])}
    out: dict[str, list[str]] = defaultdict(list)
    for bn, reason in row.get("skipped", []):
        out[bn_module(bn)].append(reason)
    for reasons in out.values():  # a real reason before "never called" (issue 10's double listing)
        reasons.sort(key=lambda r: "never called" in r)
    return {bn: r for bn, r in out.items() if bn not in folded}


def feeds_add(reason: str) -> bool:
    """Issue 14's merges: the BN's input (the producer's output) also feeds an add."""
    return bool(re.search(r"also feeds (add|\.add|iadd)", producer_part(reason)))


# --------------------------------------------------------------------------- driver and report


def run_one(spec: str, seed: int, timeout: int, reparameterize: bool = False) -> dict[str, Any]:
    cmd = ["nice", "-n", "10", sys.executable, __file__, "--worker", spec, "--seed", str(seed)]
    if reparameterize:
        cmd.append("--reparameterize")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": spec.split("@")[0], "crash": f"timeout after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        return {"model": spec.split("@")[0], "crash": f"exit {proc.returncode}: {tail}"}
    row = json.loads(lines[-1])
    row["wall_s"] = time.perf_counter() - t0
    return row


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def _model_line(r: dict[str, Any], refused: dict[str, list[str]]) -> str:
    cats = Counter(category(reasons[0]) for reasons in refused.values())
    base = (r["fx_s"] or 0) + r["forward_s"]
    ratio = r["fold_s"] / base if r["fx_s"] is not None else None
    fx = str(r["fx_folded"]) if r["fx_folded"] is not None else "no trace"
    if "ult_folded" in r:  # ultralytics' own fuse() as a peer
        fx += f" / ultralytics fuse {r['ult_folded']} ({r['ult_err']:.1e})"
    listed = len(r["folded"]) + len(r["skipped"]) + len(r.get("merged_bns", []))
    dup = f" ({listed - r['bn']} extra entries)" if listed != r["bn"] else ""
    wrong = " **WRONG**" if r["fold64_err"] > 1e-9 else ""
    classes = ", ".join(f"{c} {n}" for c, n in r["bn_classes"].items())
    merged = len(r.get("merged_bns", []))
    folded = f"{len(r['folded'])}" + (f" + {merged} merged" if merged else "")
    if r.get("merges"):  # --reparameterize: convs before -> after (ultralytics' fuse: after its fuse)
        peer = f", ultralytics {r['ult_convs']}" if "ult_convs" in r else ""
        folded += f"; {r['merges']} merges, convs {r['convs'][0]} -> {r['convs'][1]}{peer}"
    if len(r["folded64"]) != len(r["folded"]):  # the float64 copy must fold exactly as many
        folded += f" (**float64: {len(r['folded64'])}**)"
    return (f"| {r['model']} | {r['input']} | {r['bn']} ({classes}) | {folded} | {fx} | "
            f"{'; '.join(f'{c}: {n}' for c, n in cats.most_common())}{dup} | {r['tracer']} | {r['fold_s']:.2f} | "
            f"{base:.2f} | {_fmt(ratio)} | {r['fold64_err']:.1e}{wrong} | {r['folded32_err']:.1e} "
            f"({r['orig32_err']:.1e}) |")


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def report(rows: list[dict[str, Any]], seconds: float | None) -> str:
    """The markdown coverage table, totals and refusal categories with examples."""
    took = f"; {seconds / 60:.1f} min" if seconds else ""
    lines = ["# bnstrip zoo coverage", "",
             f"`scripts/zoo.py` over {len(rows)} torchvision (tv:) and timm models{took}: random init, randomised "
             "BatchNorm statistics, eval mode, one seeded input 1x3xSxS. fx fuse = BNs torch.fx's fuser removes. "
             "ratio = bnstrip fold time / (fx fuse + one forward). fold64 err = max|folded - original| / "
             "max|original| with the model folded and run in float64 (an exact fold gives ~1e-15; > 1e-9 is "
             "**WRONG**). f32 err = the float32 folded model against the float64 original (the float32 "
             "original's own error in brackets).", "",
             "| model | S | BN | folded | fx fuse | refused, by category | tracer | fold s | fx+fwd s | ratio | "
             "fold64 err | f32 err (orig) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tot: Counter[str] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    cat_models: dict[str, set[str]] = defaultdict(set)
    cat_total: Counter[str] = Counter()
    ratios: list[tuple[float, str]] = []
    for r in rows:
        if "crash" in r:
            lines.append(f"| {r['model']} | | | | | **crash**: {r['crash'][:160]} | | | | | | |")
            tot["crash"] += 1
            continue
        if not r.get("bn"):
            lines.append(f"| {r['model']} | {r['input']} | 0 | | | ({r.get('note', '')}) | | | | | | |")
            tot["no_bn"] += 1
            continue
        refused = refusals(r)
        lines.append(_model_line(r, refused))
        for bn, reasons in refused.items():
            cat = category(reasons[0])
            cat_total[cat] += 1
            cat_models[cat].add(r["model"])
            if len(examples[cat]) < 3 and not any(e.startswith(r["model"] + " ") for e in examples[cat]):
                examples[cat].append(f"{r['model']} `{bn}`")
            tot["add"] += feeds_add(reasons[0])
        if r["fx_s"] is not None:
            ratios.append((r["fold_s"] / (r["fx_s"] + r["forward_s"]), r["model"]))
        tot["models"] += 1
        tot["by_gap"] += r.get("proof") == "gap"
        tot["bn"] += r["bn"]
        tot["folded"] += len(r["folded"])
        tot["merged_bns"] += len(r.get("merged_bns", []))
        tot["refused"] += len(refused)
        tot["folded64"] += len(r["folded64"])
        tot["fx"] += r["fx_folded"] or 0
        tot["fx_traced"] += r["fx_folded"] is not None
        tot["wrong"] += r["fold64_err"] > 1e-9
        tot["none_folded"] += not r["folded"]
        tot["double_listed"] += len(r["folded"]) + len(r["skipped"]) + len(r.get("merged_bns", [])) - r["bn"]
        tot["undone32"] += len(set(r["folded64"]) - {bn for _, bn in r["folded"]})
        tot["count64_differs"] += len(r["folded64"]) != len(r["folded"])
    ratios.sort(reverse=True)
    pct = 100 * tot["folded"] / max(tot["bn"], 1)
    lines += ["", "## Totals", "",
              f"- models: {len(rows)}; with BatchNorm: {tot['models']}; without: {tot['no_bn']}; crashed or timed "
              f"out: {tot['crash']}; **wrong** (fold64 err > 1e-9): {tot['wrong']}",
              f"- BatchNorms: {tot['bn']}; folded by bnstrip: {tot['folded']} ({pct:.1f}%); refused: {tot['refused']}; "
              f"torch.fx fuse: {tot['fx']} (traced {tot['fx_traced']} models)",
              f"- BatchNorms removed by merging parallel branches (`--reparameterize`): {tot['merged_bns']}",
              f"- folded in the float64 fold but not in the float32 one: {tot['undone32']}; models whose float64 "
              f"copy folds another number of BatchNorms: {tot['count64_differs']}",
              f"- models where bnstrip folded nothing: {tot['none_folded']}; extra entries in folded+skipped "
              f"(a BN listed twice): {tot['double_listed']}",
              f"- refused BNs whose input also feeds an add (issue 14): {tot['add']}",
              f"- fold time / (fx fuse + forward): median {_median([v for v, _ in ratios]):.2f}x over "
              f"{len(ratios)} models, worst five: " + ", ".join(f"{m} {v:.1f}x" for v, m in ratios[:5]),
              f"- proofs decided by the gap in the model's own dtype, without a float64 run: {tot['by_gap']} of "
              f"{tot['models']} models", "",
              "## Refusals by category", "",
              "| category | BNs | models | examples (model `module`) |", "|---|---|---|---|"]
    lines += [f"| {c} | {n} | {len(cat_models[c])} | {'; '.join(examples[c])} |" for c, n in cat_total.most_common()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help="comma-separated tv:NAME / timm:NAME[@SIZE] (default: the built-in list)")
    parser.add_argument("--out", default="zoo.md", help="markdown coverage table")
    parser.add_argument("--json", dest="json_path", help="raw rows as JSON (written after every model)")
    parser.add_argument("--report-from", help="rebuild --out from an earlier --json file, running nothing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per model")
    parser.add_argument("--jobs", type=int, default=1, help="models measured at once (each in one thread)")
    parser.add_argument("--reparameterize", action="store_true",
                        help="fold with reparameterize=True and count BNs removed by merging branches")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(worker(args.worker, args.seed, args.reparameterize)))
        return
    if args.report_from:
        Path(args.out).write_text(report(json.loads(Path(args.report_from).read_text()), None))
        return
    specs = args.models.split(",") if args.models else DEFAULT_MODELS + (
        ULTRALYTICS_MODELS if importlib.util.find_spec("ultralytics") else [])
    rows, t0 = [], time.perf_counter()
    # Each model runs in its own single-threaded process; --jobs of them at once (fold-time ratios are
    # then measured under that load, which scales fold and fx fuse alike).
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, spec, args.seed, args.timeout, args.reparameterize): spec for spec in specs}
        for i, future in enumerate(as_completed(futures), 1):
            spec, row = futures[future], future.result()
            rows.append(row)
            summary = row.get("crash") or f"{len(row.get('folded', []))}/{row.get('bn')} folded, {row.get('fold_s', 0):.1f} s"
            print(f"[{i}/{len(specs)}] {spec}: {summary}", file=sys.stderr, flush=True)
            if args.json_path:
                Path(args.json_path).write_text(json.dumps(rows, indent=1))
    order = {spec.split("@")[0]: n for n, spec in enumerate(specs)}
    rows.sort(key=lambda r: order.get(r["model"], len(order)))
    Path(args.out).write_text(report(rows, time.perf_counter() - t0))


if __name__ == "__main__":
    main()
