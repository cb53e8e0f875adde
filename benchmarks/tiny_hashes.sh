#!/usr/bin/env bash
# Byte-identity check for refactors (issue 35): run the tiny ACDC workflow with every method (sraseg_real
# included) and a tiny FIVES phantom workflow with labeled_only, bcp_real and sraseg, from CHECKOUT's code,
# in OUTDIR, and write OUTDIR/hashes.txt: sha256 of the prepared arrays and tables, models, predictions
# and metric tables. Compare two checkouts with `diff A/hashes.txt B/hashes.txt` (empty = same numbers).
# Usage, with the venv on PATH:  benchmarks/tiny_hashes.sh CHECKOUT OUTDIR   (about 8 min on 2 cores)
set -euo pipefail
CHECKOUT=$(cd "$1" && pwd)
OUT=$2
rm -rf "$OUT" && mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cp -r "$CHECKOUT/config" "$OUT/config"
export HF_HUB_OFFLINE=1 PYTHONPATH="$CHECKOUT/src"
python - "$OUT" <<'PY'
import pathlib
import sys

import yaml

out = pathlib.Path(sys.argv[1]) / "config"
acdc = yaml.safe_load((out / "tiny.yaml").read_text())
acdc["experiments"] = {m: {"method": m} for m in ("labeled_only", "bcp_real", "bcp_synthetic", "sraseg")}
acdc["experiments"]["sraseg_real"] = {"method": "sraseg", "train": {"unlabeled": "real"}}
(out / "tiny_all.yaml").write_text(yaml.safe_dump(acdc))
fives = yaml.safe_load((out / "fives_phantom.yaml").read_text())
fives["dataset"]["name"] = "fives_tiny"
fives["fives_phantom"]["size"] = 64
fives["prepare"]["image_size"] = 32
fives["train"].update(pretrain_iterations=4, selftrain_iterations=2, val_every=2, checkpoint_every=2,
                      channels=[8, 16, 32], dropout=[0.05, 0.1, 0.2], device="cpu", switch_min_dice=0)
fives.setdefault("generator", {}).update(resolution=16, block_out_channels=[8, 16], steps=4, batch_size=4,
                                         warmup_steps=1, num_train_timesteps=50, checkpoint_every=2, log_every=2,
                                         fd_every=2, fd_samples=4, fd_sampler_steps=2)
fives.setdefault("sample", {}).update(n_images=8, inference_steps=4, batch_size=8)
fives.setdefault("embed", {}).update(img_size=56, batch_size=16)
fives["experiments"] = {m: {"method": m} for m in ("labeled_only", "bcp_real", "sraseg")}
(out / "fives_tiny.yaml").write_text(yaml.safe_dump(fives))
PY
for config in tiny_all fives_tiny; do
  snakemake --snakefile "$CHECKOUT/workflow/Snakefile" --directory "$OUT" --configfile "$OUT/config/$config.yaml" \
    --cores 2 -q > "$OUT/$config.log" 2>&1 || { echo "$config failed, see $OUT/$config.log" >&2; exit 1; }
done
cd "$OUT"
find results -type f \( -name model.safetensors -o -path '*predictions*' -o -name 'metrics*.csv' \
  -o -name images.npy -o -name labels.npy -o -name '*.parquet' -o -name summary.json -o -name results.csv \) \
  | sort | xargs sha256sum > hashes.txt
wc -l < hashes.txt
