#!/usr/bin/env bash
# Plain-install smoke: `pip install .` without dev extras into a fresh venv, then the user's path
# build -> inspect -> validate --deep -> train for both formats, with the default --shard-tokens,
# run from outside the source tree so only the installed package is importable.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-python3}"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$PY" -m venv "$work/venv"
pip="$work/venv/bin/pip"
"$pip" install -q --upgrade pip
"$pip" install -q "$TORCH_PIN"
"$pip" install -q "$repo"
rm -rf "$repo/build"  # setuptools builds in the source tree
kd="$work/venv/bin/kdcache"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
cd "$work"
for fmt in zarr arrow; do
  echo "smoke: $fmt"
  # 40 documents of the embedded corpus at --max-length 1024: 84k tokens, one default shard of
  # two Zarr inner chunks.
  "$kd" build --out "cache-$fmt" --format "$fmt" --max-documents 40 --max-length 1024 --no-progress
  "$kd" inspect "cache-$fmt"
  "$kd" validate "cache-$fmt" --deep
  "$kd" train --cache "cache-$fmt" --out "run-$fmt" --max-steps 2 --batch-tokens 4096 --no-progress
done
echo "smoke: ok"
