"""Peak memory of `bnstrip fuse` and `fold_model`, above the `import torch` baseline, in multiples of the checkpoint.

Issue 9's goal: `fuse --arch` at most baseline + 2.5x the checkpoint, on a ResNet-152-sized
model (bnstrip.testing.zoo:ResNet152Style, 230 MiB) and on smallNet; `fold_model` at most 2.5x the
model above baseline. Every figure is the peak resident set size (ru_maxrss) of its own fresh
process, so one measurement never inherits another's memory.

    nice python scripts/bench_memory.py [--smallnet smallNetSaved] [--input-shape 1,3,64,64]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_PEAK = "import resource, sys; sys.stderr.write('PEAK %d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"

BASELINE = f"import torch\n{_PEAK}"

SAVE_RESNET = """
import sys, torch
from bnstrip.testing.zoo import ResNet152Style, randomize_bn
torch.manual_seed(0)
torch.save(randomize_bn(ResNet152Style()).eval().state_dict(), sys.argv[1])
"""

FUSE = f"""
import sys
from bnstrip.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    {_PEAK}
"""

FOLD_MODEL = f"""
import sys, torch
from bnstrip import fold_model
from bnstrip.testing.zoo import ResNet152Style
with torch.device("meta"):
    model = ResNet152Style()
model.load_state_dict(torch.load(sys.argv[1], weights_only=True), assign=True)
model.eval()
import resource
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
shape = [int(d) for d in sys.argv[2].split(",")]
result = fold_model(model, (torch.rand(*shape),))
sys.stderr.write("BEFORE %d\\n" % before)
assert result.check is not None and result.check.passed, result.check
{_PEAK}
"""


def _run(code: str, *args: str) -> dict[str, int]:
    """Run `code` in a fresh interpreter; the figures it printed to stderr, in KiB."""
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    figures = {}
    for line in proc.stderr.splitlines():
        key, _, value = line.partition(" ")
        if key in ("PEAK", "BEFORE") and value.strip().isdigit():
            figures[key] = int(value)
    if proc.returncode != 0 or "PEAK" not in figures:
        raise SystemExit(f"measurement failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return figures


def measure(smallnet: Path | None, input_shape: str) -> dict[str, float]:
    baseline = _run(BASELINE)["PEAK"]
    rows: dict[str, float] = {"baseline_mib": baseline / 1024}
    with tempfile.TemporaryDirectory() as tmp:
        resnet = Path(tmp) / "resnet152.pt"
        subprocess.run([sys.executable, "-c", SAVE_RESNET, str(resnet)], cwd=ROOT, check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        size = resnet.stat().st_size / 1024
        rows["resnet152_checkpoint_mib"] = size / 1024
        peak = _run(FUSE, "fuse", "--arch", "bnstrip.testing.zoo:ResNet152Style", str(resnet), str(Path(tmp) / "out.pt"),
                    "--input-shape", input_shape)["PEAK"]
        rows["fuse_arch_resnet152_x"] = (peak - baseline) / size
        figures = _run(FOLD_MODEL, str(resnet), input_shape)
        rows["fold_model_resnet152_x"] = (figures["PEAK"] - figures["BEFORE"]) / size
        rows["fold_model_resnet152_above_baseline_x"] = (figures["PEAK"] - baseline) / size
        if smallnet is not None and smallnet.is_file():
            size = smallnet.stat().st_size / 1024
            peak = _run(FUSE, "fuse", str(smallnet), str(Path(tmp) / "smallNetTest.pt"))["PEAK"]
            rows["smallnet_checkpoint_mib"] = size / 1024
            rows["fuse_smallnet_x"] = (peak - baseline) / size
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smallnet", type=Path, default=ROOT / "smallNetSaved")
    parser.add_argument("--input-shape", default="1,3,64,64")
    args = parser.parse_args()
    print(json.dumps(measure(args.smallnet, args.input_shape), indent=2))


if __name__ == "__main__":
    main()
