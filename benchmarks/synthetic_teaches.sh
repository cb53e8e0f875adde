#!/usr/bin/env bash
# Does a synthetic set teach? One bcp_synthetic run at the phantom benchmark's protocol on a given
# synthetic folder, validated every 20 iterations in the first 200 of self-training (dense enough to see a dip at the switch to
# self-training), then its test Dice. Run it once per generator and compare the two folders.
#
#   benchmarks/synthetic_teaches.sh results/generator_study/old_schedule/synthetic results/synthetic_teaches/old
#   benchmarks/synthetic_teaches.sh results/phantom_benchmark/synthetic results/synthetic_teaches/new
#   python benchmarks/switch_dip.py results/synthetic_teaches/old results/synthetic_teaches/new     # the dip and the test Dice side by side
#
# Needs the benchmark's prepared data and raw phantom:
#   snakemake --configfile config/benchmark.yaml --cores 2 results/phantom_benchmark/prepared/slices.parquet
set -euo pipefail
synthetic=${1:?synthetic folder (images.npy)}
out=${2:?output folder}
seed=${SEED:-1337}
ds=results/phantom_benchmark
python -m sraseg train --config config/benchmark.yaml --experiment bcp_synthetic --settings '{"dense_val_every": 20, "dense_val_iterations": 200}' \
    --prepared-dir "$ds/prepared" --synthetic-dir "$synthetic" --out-dir "$out" --seed "$seed"
python -m sraseg predict -m "$out" --prepared-dir "$ds/prepared" --split test -o "$out/predictions"
python -m sraseg evaluate --pred-dir "$out/predictions" --gt-dir "resources/phantom_benchmark/raw" --out-dir "$out/eval"
