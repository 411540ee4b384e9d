#!/usr/bin/env bash
# The gate a downstream CI job runs: fold a smallNetTrain checkpoint, verify it on CIFAR-10's
# test set, fail on any non-zero exit. Usage: scripts/ci_verify.sh [CHECKPOINT] [OUT_DIR]
# Needs CIFAR-10: set BNSTRIP_DATA_DIR to a folder holding cifar-10-batches-py/ (or let bnstrip download it).
set -euo pipefail

checkpoint="${1:-smallNetSaved}"
out_dir="${2:-$(mktemp -d)}"
fused="$out_dir/smallNetTest.pt"
report="$out_dir/verify.json"

bnstrip fuse "$checkpoint" "$fused" --force --json > "$out_dir/fuse.json"
# verify exits 1 if the figure misses the tolerance, 2 on bad input: set -e stops the job either way.
bnstrip verify "$checkpoint" "$fused" --json > "$report"
python3 - "$report" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"verify: {r['images']} images (test_batch md5 {r['data_md5']}, torch {r['torch_version']}, "
      f"{r['threads']} thread(s)), max over batches of ||diff||^2 = {r['max_batch_sq_norm']:.3e} "
      f"(tolerance {r['tolerance']:g}), agreement {r['agreement']:.2%}, accuracy {r['accuracy_bn']:.2%}, "
      f"passed={r['passed']}")
sys.exit(0 if r["passed"] else 1)
PY
