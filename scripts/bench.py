#!/usr/bin/env python3
"""bnstrip's benchmark suite (issue 6): one run on one machine writes BENCHMARKS.md.

Rows, as the issue lists them:
  a. latency of smallNet and two zoo models at batch 1 and 32: BN model eager, bnstrip-folded eager,
     torch.fx `fuse`, and torch.compile with Inductor freezing; each as a speed-up over the BN model
  b. `bnstrip verify` over the 10,000 test images against the course's reference loop and the compute floor
  c. `bnstrip fuse smallNetSaved out.pt` wall time and peak RSS against `python -c "import torch"`
  d. `bnstrip --help` wall time
  e. precision of the fold against a float64 reference, bnstrip vs torch.nn.utils.fusion, in float32/16/bf16

Run from the repository root (a script, not a test; it takes several minutes):
  python scripts/bench.py --data-dir DIR                            # full run -> BENCHMARKS.md
  python scripts/bench.py --quick --data-dir DIR                    # smoke run -> stdout
  python scripts/bench.py --only b,c                                # some rows only
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bnstrip.bench import Spread, Timing, compare, seeded_batch, time_interleaved  # noqa: E402

ZOO_MODELS = ("bnstrip.testing.zoo:ResNet18Style", "bnstrip.testing.zoo:MobileNetV2Style")
ZOO_SAMPLE_SHAPE = (3, 32, 32)
PRECISION_DTYPES = (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16))


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ratio_text(spread: Spread, noisy: bool = False) -> str:
    text = f"{spread.median:.2f}x ({spread.min:.2f}-{spread.max:.2f})"
    return f"{text}, within noise" if noisy else text


def seconds_text(spread: Spread) -> str:
    return f"{spread.median:.3g} s ({spread.min:.3g}-{spread.max:.3g})"


def ms_text(spread: Spread) -> str:
    return f"{spread.median * 1e3:.3g} ({spread.min * 1e3:.3g})"


def bnstrip_command() -> list[str]:
    """The console script next to this interpreter (what a user runs), else `python -m bnstrip`."""
    script = Path(sys.executable).parent / "bnstrip"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bnstrip"]


@dataclass
class Goal:
    """One of the issue's targets, with the figure measured against it."""

    row: str
    goal: str
    measured: str
    met: bool
    why: str = ""


@dataclass
class Report:
    """Everything BENCHMARKS.md says, filled row by row."""

    machine: dict[str, Any]
    sections: list[str] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    speedups: list[tuple[str, int, Spread, bool]] = field(default_factory=list)  # model, batch, bnstrip speed-up, noisy
    precision: list[tuple[str, float, float]] = field(default_factory=list)  # dtype, max |diff| bnstrip, fusion


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "load_at_start": os.getloadavg(), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


# --------------------------------------------------------------------------- a. latency (in a worker process)


def compile_with_freezing(model: torch.nn.Module, x: torch.Tensor) -> tuple[Callable[[], Any], float]:
    """torch.compile (Inductor, freezing on) of the BN model for this input shape; returns a call and the compile time."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=False)
    started = time.perf_counter()
    compiled(x)
    return (lambda: compiled(x)), time.perf_counter() - started


def latency_worker(args: argparse.Namespace) -> None:
    """Row a for one model, in its own process so a hanging compile can be killed; one JSON object on stdout."""
    from torch.fx.experimental.optimization import fuse as fx_fuse

    from bnstrip.bench import arch_pair, smallnet_pair

    if args.worker_latency == "smallnet":
        pair = smallnet_pair(args.checkpoint)
    else:
        pair = arch_pair(args.worker_latency, ZOO_SAMPLE_SHAPE)
    fx_model = fx_fuse(pair.bn_model)
    bn_left = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fx_model.modules())
    rows = []
    for batch in args.batch_sizes:
        x = seeded_batch(batch, pair.sample_shape)
        with torch.inference_mode():
            candidates: dict[str, Callable[[], Any]] = {
                "bn": lambda: pair.bn_model(x), "bnstrip": lambda: pair.folded_model(x), "fx": lambda: fx_model(x)}
            compile_note = "not tried (--no-compile)" if not args.compile else ""
            if args.compile:
                try:
                    candidates["compile"], seconds = compile_with_freezing(pair.bn_model, x)
                    compile_note = f"compiled in {seconds:.0f} s"
                except Exception as exc:  # noqa: BLE001 - any compiler failure is a finding to report
                    first = (str(exc).strip().splitlines() or [""])[0][:160]
                    compile_note = f"failed: {type(exc).__name__}: {first}"
            timings = time_interleaved(candidates, repeat=args.repeat, warmup=3)
        rows.append({
            "batch": batch, "compile_note": compile_note,
            "timings": {name: list(t.seconds) for name, t in timings.items()},
            "calls_per_sample": timings["bn"].calls_per_sample,
        })
    print(json.dumps({"model": args.worker_latency, "folded": pair.folded, "fx_bn_left": bn_left, "rows": rows}))


def row_latency(args: argparse.Namespace, report: Report) -> None:
    models = ["smallnet", *ZOO_MODELS]
    lines = ["## a. Latency: BN model vs folded (bnstrip, torch.fx fuse, torch.compile with freezing)", "",
             f"Per call, {args.repeat} interleaved rounds after 3 warm-up calls, torch.inference_mode, "
             f"{torch.get_num_threads()} threads; inputs 3x32x32. Cells: speed-up over the BN model (BN time / its time), "
             "median of the rounds' paired ratios (min-max); 'within noise' where the timings' interquartile ranges overlap or the ratios' contains 1.", "",
             "| model | batch | BN model ms, median (min) | bnstrip folded | torch.fx fuse | torch.compile + freezing |",
             "|---|---|---|---|---|---|"]
    notes, worst_bnstrip = [], []
    for model in models:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker-latency", model, "--checkpoint", args.checkpoint,
                   "--repeat", str(args.repeat), "--batch-sizes", ",".join(map(str, args.batch_sizes))]
        if not args.compile:
            command.append("--no-compile")
        log(f"a. latency of {model}" + (" (with torch.compile)" if args.compile else ""))
        payload, failure = _run_worker(command, args.compile_timeout if args.compile else 600)
        if payload is None and args.compile:
            notes.append(f"{model}: torch.compile run {failure}; timed again without it")
            payload, failure = _run_worker([*command, "--no-compile"], 600)
        if payload is None:
            lines.append(f"| {model} | - | failed: {failure} | | | |")
            continue
        name = "smallNet" if model == "smallnet" else model.split(":")[1]
        if payload["fx_bn_left"]:
            notes.append(f"{name}: torch.fx fuse left {payload['fx_bn_left']} BatchNorm(s) unfused (it only fuses a BN "
                         "directly after a conv/linear whose output nothing else uses); bnstrip folded "
                         f"{payload['folded']}")
        for row in payload["rows"]:
            timings = {k: Timing(k, tuple(v), row["calls_per_sample"]) for k, v in row["timings"].items()}
            cells = []
            for candidate in ("bnstrip", "fx", "compile"):
                if candidate in timings:
                    speedup = compare(timings["bn"], timings[candidate])
                    cells.append(ratio_text(speedup.spread, speedup.within_noise))
                    if candidate == "bnstrip":
                        worst_bnstrip.append((speedup.median, f"{name} batch {row['batch']}"))
                        report.speedups.append((name, int(row["batch"]), speedup.spread, speedup.within_noise))
                else:
                    cells.append(row["compile_note"] or "n/a")
            if "compile" in timings:
                notes.append(f"{name} batch {row['batch']}: torch.compile {row['compile_note']}")
            lines.append(f"| {name} | {row['batch']} | {ms_text(timings['bn'].spread)} | {' | '.join(cells)} |")
    lines += ["", *[f"- {n}" for n in notes], "",
              "Reproduce: `python scripts/bench.py --only a` (all columns); bnstrip's column alone: "
              "`bnstrip bench --batch-size 1,32` (smallNet from smallNetSaved), "
              f"`bnstrip bench --arch {ZOO_MODELS[0]} --batch-size 1,32`, `bnstrip bench --arch {ZOO_MODELS[1]} --batch-size 1,32`.", ""]
    report.sections.append("\n".join(lines))


def _run_worker(command: list[str], timeout: float) -> tuple[dict[str, Any] | None, str]:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, f"did not finish within {timeout:.0f} s"
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1][:200]
        return None, f"exited {done.returncode}: {tail}"
    return json.loads(done.stdout), ""


# --------------------------------------------------------------------------- b. verify


def course_reference_loop(bn_model: torch.nn.Module, folded_model: torch.nn.Module, images: Any) -> float:
    """The course's check: batches of 100, the two models one after the other under torch.no_grad.

    The course decodes with torchvision's per-image ToTensor; here a whole batch is decoded the
    same way (uint8 / 255) at once, which can only make this reference faster.
    """
    worst = 0.0
    with torch.no_grad():
        for start in range(0, len(images), 100):
            x = torch.from_numpy(images[start:start + 100]).float().div(255)
            diff = bn_model(x) - folded_model(x)
            worst = max(worst, float(torch.norm(diff) ** 2))
    return worst


def count_flops(model: torch.nn.Module, sample_shape: tuple[int, ...]) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) of the conv and of the linear layers for one sample."""
    total = {"conv": 0, "linear": 0}

    def conv_hook(module: torch.nn.Conv2d, _inputs: Any, output: torch.Tensor) -> None:
        per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        total["conv"] += 2 * output.numel() * per_output

    def linear_hook(module: torch.nn.Linear, _inputs: Any, output: torch.Tensor) -> None:
        total["linear"] += 2 * output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    with torch.inference_mode():
        model(torch.zeros(1, *sample_shape))
    for handle in handles:
        handle.remove()
    return total


def op_shares(bn_model: torch.nn.Module, folded_model: torch.nn.Module, images: Any, channels_last: bool) -> str:
    """Where verify's time goes (torch.profiler over 1,000 images), for the 'why' of a missed goal."""
    from torch.profiler import ProfilerActivity, profile

    from bnstrip.homework.verify import verify_models

    subset = images[:1000]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        verify_models(bn_model, folded_model, subset, [0] * len(subset), channels_last=channels_last)
    groups = {"matmul (fc layers)": ("aten::addmm", "aten::mm"), "convolution": ("aten::mkldnn_convolution",
              "aten::_slow_conv2d_forward", "aten::convolution_overrideable"),
              "ReLU": ("aten::clamp_min", "aten::relu"), "BatchNorm": ("aten::native_batch_norm",),
              "copies/layout": ("aten::copy_", "aten::contiguous", "aten::clone")}
    totals = {k: 0.0 for k in groups}
    everything = 0.0
    for event in prof.key_averages():
        everything += event.self_cpu_time_total
        for group, names in groups.items():
            if event.key in names:
                totals[group] += event.self_cpu_time_total
    totals["other"] = everything - sum(totals.values())
    return ", ".join(f"{k} {v / everything:.0%}" for k, v in totals.items() if everything)


def row_verify(args: argparse.Namespace, report: Report, pair: Any) -> None:
    from bnstrip.homework.data import load_split
    from bnstrip.homework.verify import verify_models

    split = load_split("test", args.data_dir, allow_download=False)
    images, labels = split.images[:args.images], split.labels[:args.images]
    n = len(labels)
    counts = [count_flops(model, pair.sample_shape) for model in (pair.bn_model, pair.folded_model)]
    linear_share = sum(c["linear"] for c in counts) / sum(sum(c.values()) for c in counts)
    per_image = sum(sum(c.values()) for c in counts)
    flops = per_image * n
    k = m_cols = 4096
    rows = max(1, round(flops / (2 * k * m_cols)))
    a, b = torch.rand(rows, k), torch.rand(k, m_cols)
    out = torch.empty(rows, m_cols)
    figures: dict[str, float] = {}

    def ours(channels_last: bool) -> Callable[[], None]:
        def run() -> None:
            figures[f"verify_cl{int(channels_last)}"] = verify_models(
                pair.bn_model, pair.folded_model, images, labels, channels_last=channels_last).max_batch_sq_norm
        return run

    def reference() -> None:
        figures["reference"] = course_reference_loop(pair.bn_model, pair.folded_model, images)

    candidates = {"reference": reference, "verify": ours(False), "verify_cl": ours(True),
                  "floor": lambda: torch.mm(a, b, out=out)}  # noqa: F821 - timed before the del below
    log(f"b. verify vs reference loop vs floor: {n} images, {args.verify_repeat} rounds")
    timings = time_interleaved(candidates, repeat=args.verify_repeat, warmup=0, min_sample_seconds=0)
    del a, b, out
    log("b. profile of verify's op mix, and the CLI end to end")
    shares = {cl: op_shares(pair.bn_model, pair.folded_model, images, cl) for cl in (False, True)}
    cli_args = ["verify", "--checkpoint", args.checkpoint, "--data-dir", str(split.source), "--json", "--no-download"]
    if args.images < 10000:
        cli_args += ["--limit", str(args.images)]
    started = time.perf_counter()
    done = subprocess.run([*bnstrip_command(), *cli_args], capture_output=True, text=True, cwd=ROOT)
    cli_wall = time.perf_counter() - started
    cli_note = (f"{cli_wall:.2f} s end to end (start-up, load, fold, decode, verify; reported verify time "
                f"{json.loads(done.stdout)['seconds']:.2f} s)" if done.returncode == 0 else f"exited {done.returncode}")

    ref = timings["reference"]
    lines = ["## b. `bnstrip verify` over the test images vs the course's loop and the compute floor", "",
             f"{n} CIFAR-10 test images, batch 100 for the figure, {args.verify_repeat} interleaved rounds "
             f"(`verify_models`, the library call the command makes, timed in-process like the reference loop). "
             f"Compute floor: both models' conv+linear FLOPs ({per_image / 1e6:.1f} MFLOP per image, "
             f"{flops / 1e9:.0f} GFLOP in all) as one torch.mm of {rows}x{k} by {k}x{m_cols}, timed here.", "",
             "| run | wall, median (min-max) | vs reference loop | vs floor | max over batches of ‖diff‖² |",
             "|---|---|---|---|---|"]
    names = {"reference": "course's loop (batch 100, no_grad, models one after the other)",
             "verify": "bnstrip verify (default NCHW layout: bit-identical to the loop)",
             "verify_cl": "bnstrip verify, channels_last inputs", "floor": "compute floor (one torch.mm)"}
    figure_key = {"reference": "reference", "verify": "verify_cl0", "verify_cl": "verify_cl1"}
    for key, label in names.items():
        t = timings[key]
        vs_ref = compare(t, ref) if key != "reference" else None
        vs_floor = compare(t, timings["floor"])
        lines.append(f"| {label} | {seconds_text(t.spread)} | "
                     f"{'1' if vs_ref is None else ratio_text(vs_ref.spread)} | {ratio_text(vs_floor.spread)} | "
                     f"{figures.get(figure_key.get(key, ''), float('nan')):.3g} |")
    lines += ["", "Ratios here are time / reference time and time / floor time (lower is better), median (min-max) of paired rounds.",
              f"- op mix of verify, NCHW: {shares[False]}", f"- op mix of verify, channels_last: {shares[True]}",
              f"- `bnstrip {' '.join('DIR' if a == str(split.source) else a for a in cli_args)}`: {cli_note}", "",
              f"Reproduce: `python scripts/bench.py --only b --data-dir DIR`; "
              f"the command itself: `bnstrip verify --checkpoint {args.checkpoint} --data-dir DIR`.", ""]
    report.sections.append("\n".join(lines))

    best_key = min(("verify", "verify_cl"), key=lambda k: timings[k].median)
    # the fc layers alone, at the floor's rate: no schedule of these two models can beat this
    fc_bound = linear_share * timings["floor"].median / ref.median
    vs_ref = compare(timings[best_key], ref).spread
    vs_floor = compare(timings[best_key], timings["floor"]).spread
    label = "channels_last" if best_key == "verify_cl" else "NCHW"
    report.goals.append(Goal("b", "verify ≤ 0.8x the reference loop's wall time", f"{vs_ref.median:.2f}x ({label}; "
                             f"{vs_ref.min:.2f}-{vs_ref.max:.2f})", vs_ref.median <= 0.8,
                             "" if vs_ref.median <= 0.8 else
                             f"the fc layers are {linear_share:.0%} of the FLOPs and the loop already runs them as large "
                             f"GEMMs: at the floor's own rate they alone take {fc_bound:.2f}x the loop's time, leaving "
                             f"{0.8 - fc_bound:.2f}x for every convolution, BatchNorm, ReLU and copy of both models "
                             f"(op mix: {shares[best_key == 'verify_cl']})"))
    report.goals.append(Goal("b", "verify within 1.35x of the compute floor", f"{vs_floor.median:.2f}x ({label}; "
                             f"{vs_floor.min:.2f}-{vs_floor.max:.2f})", vs_floor.median <= 1.35,
                             "" if vs_floor.median <= 1.35 else
                             "the floor runs every FLOP at large-GEMM efficiency; smallNet's 3- and 16-channel convolutions "
                             "cannot, and ReLU, BatchNorm and layout copies move 64 KB per image per layer without "
                             f"FLOPs that count ({shares[best_key == 'verify_cl']})"))


# --------------------------------------------------------------------------- c. fuse, d. --help


_MEASURE_CHILD = r"""
import json, os, subprocess, sys, time
with open(sys.argv[1], "wb") as errors:
    started = time.perf_counter()
    proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=errors)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
print(json.dumps({"wall": wall, "maxrss_kb": usage.ru_maxrss, "code": os.waitstatus_to_exitcode(status)}))
"""


def run_measured(command: list[str]) -> tuple[float, int, int]:
    """Wall seconds, peak RSS (bytes) and exit code of one child process.

    Launched from a small helper interpreter: Linux starts a child's ru_maxrss at the RSS
    of the process it was forked from, so forking from this (large) process would inflate it.
    """
    with tempfile.NamedTemporaryFile(suffix=".err") as errors:
        done = subprocess.run([sys.executable, "-c", _MEASURE_CHILD, errors.name, *command], capture_output=True,
                              text=True, cwd=ROOT, check=True)
        result = json.loads(done.stdout)
        if result["code"] != 0:
            raise RuntimeError(f"{' '.join(command)} exited {result['code']}: {Path(errors.name).read_text()[-300:]}")
    return result["wall"], result["maxrss_kb"] * 1024, result["code"]


def fuse_breakdown(checkpoint: str, out_dir: Path) -> str:
    """In-process seconds of fuse's steps (torch already imported), for the 'why' of a missed wall-time goal."""
    from bnstrip.io.checkpoint import load_checkpoint, save_checkpoint
    from bnstrip.homework.smallnet import fuse_smallnet

    steps = {}
    started = time.perf_counter()
    loaded = load_checkpoint(checkpoint)
    steps["load+validate"] = time.perf_counter() - started
    started = time.perf_counter()
    result = fuse_smallnet(loaded.state_dict, source=checkpoint)
    steps["fold+self-check"] = time.perf_counter() - started
    started = time.perf_counter()
    save_checkpoint(result.state_dict, out_dir / "breakdown.pt", force=True)
    steps["save"] = time.perf_counter() - started
    return ", ".join(f"{k} {v:.2f} s" for k, v in steps.items())


def row_fuse_and_help(args: argparse.Namespace, report: Report) -> None:
    ckpt_size = os.path.getsize(args.checkpoint)
    with tempfile.TemporaryDirectory(prefix="bnstrip-bench-") as tmp:
        out = Path(tmp) / "out.pt"
        fuse = [*bnstrip_command(), "fuse", args.checkpoint, str(out), "--force"]
        baseline = [sys.executable, "-c", "import torch"]
        log(f"c. fuse vs import torch, {args.fuse_repeat} rounds")
        run_measured(baseline)  # warm the page cache for both
        run_measured(fuse)
        walls: dict[str, list[float]] = {"fuse": [], "import": []}
        rss: dict[str, list[int]] = {"fuse": [], "import": []}
        for _ in range(args.fuse_repeat):
            for key, command in (("fuse", fuse), ("import", baseline)):
                wall, peak, _ = run_measured(command)
                walls[key].append(wall)
                rss[key].append(peak)
        breakdown = fuse_breakdown(args.checkpoint, Path(tmp))
    t_fuse, t_import = Timing("fuse", tuple(walls["fuse"]), 1), Timing("import", tuple(walls["import"]), 1)
    ratios = Spread.of([f / i for f, i in zip(walls["fuse"], walls["import"], strict=True)])  # paired: fuse time / import time
    rss_fuse, rss_import = statistics.median(rss["fuse"]), statistics.median(rss["import"])
    limit = rss_import + 2.5 * ckpt_size
    mb = 1 / 2**20

    log(f"d. bnstrip --help, {args.help_repeat} rounds")
    help_walls, python_walls = [], []
    for _ in range(args.help_repeat):
        help_walls.append(run_measured([*bnstrip_command(), "--help"])[0])
        python_walls.append(run_measured([sys.executable, "-c", "pass"])[0])
    help_spread = Spread.of(help_walls)

    lines = ["## c. `bnstrip fuse smallNetSaved out.pt` vs `python -c \"import torch\"`", "",
             f"Checkpoint {args.checkpoint}: {ckpt_size * mb:.1f} MiB. {args.fuse_repeat} interleaved rounds, each a fresh "
             "process; peak RSS from wait4 (ru_maxrss).", "",
             "| process | wall, median (min-max) | peak RSS, median |", "|---|---|---|",
             f"| `python -c \"import torch\"` | {seconds_text(t_import.spread)} | {rss_import * mb:.0f} MiB |",
             f"| `bnstrip fuse {args.checkpoint} out.pt --force` | {seconds_text(t_fuse.spread)} | {rss_fuse * mb:.0f} MiB |",
             "", f"fuse / import wall: {ratio_text(ratios)}; peak RSS above the import baseline: "
             f"{(rss_fuse - rss_import) * mb:.0f} MiB = {(rss_fuse - rss_import) / ckpt_size:.2f}x the checkpoint "
             f"(limit {limit * mb:.0f} MiB). In-process steps after import: {breakdown}.", "",
             f"Reproduce: `python scripts/bench.py --only c`, or `/usr/bin/time -v bnstrip fuse {args.checkpoint} out.pt`.",
             "", "## d. `bnstrip --help`", "",
             f"{args.help_repeat} runs: {seconds_text(help_spread)}; bare `python -c pass` on this machine: "
             f"{seconds_text(Spread.of(python_walls))}. bnstrip imports no torch for --help "
             "(checked by tests/test_cli.py).", "", "Reproduce: `python scripts/bench.py --only d`, "
             "or `time bnstrip --help`.", ""]
    report.sections.append("\n".join(lines))
    report.goals.append(Goal("c", "fuse wall ≤ 1.5x `import torch`", ratio_text(ratios), ratios.median <= 1.5,
                             "" if ratios.median <= 1.5 else f"the work after import takes {breakdown}"))
    report.goals.append(Goal("c", "fuse peak RSS ≤ import baseline + 2.5x checkpoint",
                             f"{rss_fuse * mb:.0f} MiB vs limit {limit * mb:.0f} MiB "
                             f"(+{(rss_fuse - rss_import) / ckpt_size:.2f}x)", rss_fuse <= limit,
                             "" if rss_fuse <= limit else "input and folded output are both resident (2x) while the self-check runs"))
    report.goals.append(Goal("d", "`bnstrip --help` ≤ 0.3 s", seconds_text(help_spread), help_spread.median <= 0.3,
                             "" if help_spread.median <= 0.3 else
                             f"the interpreter alone takes {statistics.median(python_walls):.3g} s here"))


# --------------------------------------------------------------------------- e. precision


def fusion_fold(state: dict[str, torch.Tensor], eps: float) -> dict[str, torch.Tensor]:
    """smallNetTest state_dict folded by torch.nn.utils.fusion (arithmetic in the checkpoint's own dtype)."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

    from bnstrip.homework.models import SMALLNET_PAIRS

    out = dict(state)
    for producer, bn in SMALLNET_PAIRS:
        w, b = state[f"{producer}.weight"], state[f"{producer}.bias"]
        stats = [state[f"{bn}.running_mean"], state[f"{bn}.running_var"], eps, state[f"{bn}.weight"], state[f"{bn}.bias"]]
        fuse = fuse_conv_bn_weights if w.dim() == 4 else fuse_linear_bn_weights
        fw, fb = fuse(w, b, *stats)
        out[f"{producer}.weight"], out[f"{producer}.bias"] = fw.detach(), fb.detach()
        for suffix in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            out.pop(f"{bn}.{suffix}", None)
    return out


def row_precision(args: argparse.Namespace, report: Report) -> None:
    from bnstrip.io.checkpoint import load_checkpoint
    from bnstrip.homework.models import SMALLNET_EPS
    from bnstrip.homework.smallnet import build_models, fuse_smallnet

    state = load_checkpoint(args.checkpoint).state_dict
    try:
        from bnstrip.homework.data import load_split

        images = load_split("test", args.data_dir, allow_download=False).images[:args.precision_images]
        x = torch.from_numpy(images).to(torch.float64).div(255)
        source = f"the first {len(images)} CIFAR-10 test images"
    except Exception:  # noqa: BLE001 - no data: seeded images still measure the fold
        x = seeded_batch(args.precision_images, (3, 32, 32), dtype=torch.float64)
        source = f"{args.precision_images} seeded uniform images"
    lines = ["## e. Precision of the folded weights: max |diff| against a float64 reference", "",
             f"The smallNet checkpoint cast to each dtype is the input. Reference: the BN model in float64 from those values. "
             f"Each folded state_dict (stored in that dtype) is then run in float64 too, on {source}, so the figure is the "
             "fold's own rounding, not the inference's.", "",
             "| checkpoint dtype | max abs diff, bnstrip | max abs diff, torch.nn.utils.fusion | fusion / bnstrip | "
             "RMS diff, bnstrip | RMS diff, fusion | fusion / bnstrip (RMS) |", "|---|---|---|---|---|---|---|"]
    log("e. precision")
    for name, dtype in PRECISION_DTYPES:
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        ours = fuse_smallnet(cast, source=f"{args.checkpoint} as {name}").state_dict
        theirs = fusion_fold(cast, SMALLNET_EPS)
        with torch.inference_mode():
            reference_model, ours_model = build_models(cast, ours, SMALLNET_EPS, torch.float64)
            reference = reference_model(x)
            _, theirs_model = build_models(cast, theirs, SMALLNET_EPS, torch.float64)
            error_ours, error_theirs = ours_model(x) - reference, theirs_model(x) - reference
        diff_ours, diff_theirs = float(error_ours.abs().max()), float(error_theirs.abs().max())
        rms_ours, rms_theirs = float(error_ours.square().mean().sqrt()), float(error_theirs.square().mean().sqrt())
        ratio = diff_theirs / diff_ours if diff_ours > 0 else float("inf")
        rms_ratio = rms_theirs / rms_ours if rms_ours > 0 else float("inf")
        report.precision.append((name, diff_ours, diff_theirs))
        lines.append(f"| {name} | {diff_ours:.3g} | {diff_theirs:.3g} | {ratio:.2f}x | {rms_ours:.3g} | {rms_theirs:.3g} | "
                     f"{rms_ratio:.2f}x |")
        if dtype == torch.float32:
            report.goals.append(Goal("e", "float32: no worse than torch.nn.utils.fusion", f"{diff_ours:.3g} vs {diff_theirs:.3g}",
                                     diff_ours <= diff_theirs, "" if diff_ours <= diff_theirs else
                                     "both round each folded value once to float32; the difference is which "
                                     "way single roundings fall, not a systematic error"))
        else:
            report.goals.append(Goal("e", f"{name}: at least 2x better than torch.nn.utils.fusion", f"{ratio:.2f}x",
                                     ratio >= 2, "" if ratio >= 2 else
                                     f"bnstrip stores the exact float64 fold rounded once to {name}, the nearest values a "
                                     f"{name} file can hold, so its error is that one rounding; fusion's extra {name} "
                                     f"roundings (scale, then product) add only {ratio - 1:.0%} on top of it here "
                                     f"(RMS: {rms_ratio:.2f}x)"))
    lines += ["", "Reproduce: `python scripts/bench.py --only e`.", ""]
    report.sections.append("\n".join(lines))


# --------------------------------------------------------------------------- plots

PLOT_DIR = "docs/bench"
"""Where the PNG figures go, relative to the repository root (committed, linked from BENCHMARKS.md)."""


def write_plots(report: Report, out_dir: Path) -> list[str]:
    """speed-up per model and batch (median, min-max bars) and max |diff| per dtype; needs the `bench` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (pip install -e '.[bench]'): no plots")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if report.speedups:
        fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
        labels = [f"{model}\nbatch {batch}" for model, batch, _, _ in report.speedups]
        medians = [spread.median for _, _, spread, _ in report.speedups]
        low = [spread.median - spread.min for _, _, spread, _ in report.speedups]
        high = [spread.max - spread.median for _, _, spread, _ in report.speedups]
        colours = ["0.7" if noisy else "tab:blue" for *_, noisy in report.speedups]
        ax.bar(range(len(labels)), medians, yerr=[low, high], color=colours, capsize=3)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylabel("speed-up (BN time / folded time)")
        ax.set_title("Folding with bnstrip: median speed-up, min-max over rounds (grey: within noise)", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "speedup.png")
        plt.close(fig)
        written.append(f"{PLOT_DIR}/speedup.png")
    if report.precision:
        fig, ax = plt.subplots(figsize=(6.4, 3.0), dpi=100)
        names = [name for name, _, _ in report.precision]
        positions = range(len(names))
        ax.bar([p - 0.2 for p in positions], [ours for _, ours, _ in report.precision], width=0.4, label="bnstrip")
        ax.bar([p + 0.2 for p in positions], [theirs for _, _, theirs in report.precision], width=0.4,
               label="torch.nn.utils.fusion")
        ax.set_yscale("log")
        ax.set_xticks(list(positions), names)
        ax.set_ylabel("max |diff| vs float64 BN model")
        ax.set_title("How exact is the folded smallNet, per checkpoint dtype (lower is better)", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "precision.png")
        plt.close(fig)
        written.append(f"{PLOT_DIR}/precision.png")
    return written


def answers(report: Report, plots: list[str]) -> list[str]:
    """The questions users ask first, answered from this run's figures."""
    lines = ["## Does folding make my model faster?", ""]
    if report.speedups:
        for model, batch, spread, noisy in report.speedups:
            verdict = "within noise" if noisy else f"{spread.median:.2f}x faster"
            lines.append(f"- {model}, batch {batch}: {verdict} (median {spread.median:.2f}x, "
                         f"{spread.min:.2f}-{spread.max:.2f} over rounds)")
        lines += ["", "Folding removes one elementwise pass per BatchNorm; it pays most where those passes are a "
                  "large share of the time (small batches of conv-heavy models).", ""]
    if f"{PLOT_DIR}/speedup.png" in plots:
        lines += [f"![speed-up per model and batch]({PLOT_DIR}/speedup.png)", ""]
    lines += ["## How exact is it, per dtype?", ""]
    if report.precision:
        for name, ours, theirs in report.precision:
            lines.append(f"- {name} checkpoint: max |diff| {ours:.3g} against the float64 BN model "
                         f"(torch.nn.utils.fusion: {theirs:.3g})")
        lines += ["", "bnstrip folds in float64 and rounds once to the checkpoint's dtype, so the error is one rounding "
                  "of each folded weight. The course's 1e-8 bar on ||diff||^2 is a float32 bar: a float16 checkpoint "
                  "cannot meet it (fold it to float32 for the homework).", ""]
    if f"{PLOT_DIR}/precision.png" in plots:
        lines += [f"![max |diff| per dtype]({PLOT_DIR}/precision.png)", ""]
    lines += ["## Memory", "", "(filled in by the lead from the pipeline engineer's measurements)", ""]
    return lines


# --------------------------------------------------------------------------- report


def render(report: Report, args: argparse.Namespace, seconds: float, plots: list[str] | None = None) -> str:
    m = report.machine
    load_end = os.getloadavg()
    quiet = m["load_at_start"][0] <= 0.5
    lines = ["# bnstrip benchmarks", "",
             f"Written by `scripts/bench.py{' --quick' if args.quick else ''}` on {m['date']} in {seconds / 60:.1f} min. "
             "One run, one machine; every number below comes from that run.", "",
             f"- CPU: {m['cpu']}, {m['logical_cpus']} logical CPUs; torch {m['torch']} with {m['torch_threads']} threads; "
             f"Python {m['python']}; {m['platform']}",
             f"- load average (1/5/15 min) at start: {', '.join(f'{v:.2f}' for v in m['load_at_start'])}; "
             f"at end: {', '.join(f'{v:.2f}' for v in load_end)}"]
    if not quiet:
        lines.append("- **The machine was not quiet when this run started** (1-minute load above 0.5 before any "
                     "benchmark ran): other processes competed for the CPUs, so timings are noisier and slower than "
                     "on an idle machine. Rerun on a quiet machine before quoting them.")
    lines += ["", *answers(report, plots or [])]
    lines += ["## Details", "", "The sections below hold every measurement of this run. Reproduce all of it with "
              "`pip install -e '.[bench]'` and `python scripts/bench.py` from the repository root (about 5 min; "
              "`--data-dir DIR` or `$BNSTRIP_DATA_DIR` for CIFAR-10, `--only a,e` for a part).", "",
              "### Project goals", "", "| row | goal | measured | status |", "|---|---|---|---|"]
    for goal in report.goals:
        status = "met" if goal.met else f"**missed**: {goal.why}"
        lines.append(f"| {goal.row} | {goal.goal} | {goal.measured} | {status} |")
    lines += ["", "Spreads are min-max over interleaved rounds unless stated; medians are the headline figures.", ""]
    return "\n".join(lines + report.sections)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="smallNetSaved", help="smallNetTrain checkpoint (default: smallNetSaved)")
    parser.add_argument("--data-dir", default=os.environ.get("BNSTRIP_DATA_DIR"),
                        help="folder holding cifar-10-batches-py/ (default: $BNSTRIP_DATA_DIR)")
    parser.add_argument("--out", default=None, help="where to write the report (default BENCHMARKS.md; stdout with --quick)")
    parser.add_argument("--only", default="a,b,c,d,e", help="rows to run, e.g. b,c (c and d run together)")
    parser.add_argument("--quick", action="store_true", help="smoke run: few rounds, 1,000 images, no torch.compile")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile in row a")
    parser.add_argument("--compile-timeout", type=float, default=300, help="seconds per model for row a with torch.compile")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help=f"do not write the PNGs under {PLOT_DIR}/")
    parser.add_argument("--worker-latency", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch-sizes", default="1,32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    quick = args.quick
    args.repeat = args.repeat or (3 if quick else 15)
    args.verify_repeat = 1 if quick else 3
    args.images = 1000 if quick else 10000
    args.fuse_repeat = 2 if quick else 5
    args.help_repeat = 3 if quick else 10
    args.precision_images = 32 if quick else 256
    if quick:
        args.compile = False
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker_latency:
        latency_worker(args)
        return 0
    if not os.path.exists(args.checkpoint):
        print(f"scripts/bench.py: {args.checkpoint} not found; pass --checkpoint", file=sys.stderr)
        return 2
    rows = set(args.only.split(","))
    started = time.perf_counter()
    report = Report(machine_info())
    log(f"machine: {report.machine['cpu']}, load {report.machine['load_at_start']}")
    if "a" in rows:
        row_latency(args, report)
    if "b" in rows:
        from bnstrip.bench import smallnet_pair

        row_verify(args, report, smallnet_pair(args.checkpoint))
    if rows & {"c", "d"}:
        row_fuse_and_help(args, report)
    if "e" in rows:
        row_precision(args, report)
    plots = write_plots(report, ROOT / PLOT_DIR) if args.plots else []
    text = render(report, args, time.perf_counter() - started, plots)
    out = args.out or (None if args.quick else str(ROOT / "BENCHMARKS.md"))
    if out is None:
        print(text)
    else:
        tmp = f"{out}.tmp"
        Path(tmp).write_text(text + "\n")
        os.replace(tmp, out)
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
