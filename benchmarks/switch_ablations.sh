#!/usr/bin/env bash
# One-seed ablations of SRA-Seg's self-training at the switch (issue 22): config/switch_ablations.yaml over
# config/benchmark.yaml, seed 1337, then the table of the switch (teacher, first and lowest student
# validation in the first 200 self-training iterations, the dip, test Dice) beside the benchmark's
# bcp_synthetic run of that seed and sraseg_previous (SRA-Seg with the defaults before the ablations). With no arguments every ablation runs, in the file's order.
#   benchmarks/switch_ablations.sh                                   # all
#   benchmarks/switch_ablations.sh sraseg_pseudo_half bcp_synthetic_soft
set -euo pipefail
ds=results/phantom_benchmark
configs=(config/benchmark.yaml config/switch_ablations.yaml)
if [[ $# -eq 0 ]]; then
    set -- $(python -c 'import sys, yaml; print(" ".join(yaml.safe_load(open(sys.argv[1]))["experiments"]))' config/switch_ablations.yaml)
fi
targets=() runs=()
for exp in "$@"; do targets+=("$ds/$exp/seed1337/eval/summary.json"); runs+=("$ds/$exp/seed1337"); done
snakemake --configfile "${configs[@]}" --cores "${CORES:-2}" --resources gpu="${CORES:-2}" \
    --set-threads train=1 predict=1 -- "${targets[@]}"
python benchmarks/switch_dip.py "$ds/bcp_synthetic/seed1337" "$ds/sraseg_previous/seed1337" "${runs[@]}"
