#!/usr/bin/env bash
# One training at the phantom benchmark's protocol on a given unlabeled set, validated every 20
# iterations in the first 200 of self-training (dense enough to see a dip at the switch), then its
# test Dice. Two uses:
#
# Does a synthetic set teach? bcp_synthetic (the default) on each generator's samples:
#   benchmarks/synthetic_teaches.sh results/generator_study/old_schedule/synthetic results/synthetic_teaches/old
#   benchmarks/synthetic_teaches.sh results/phantom_benchmark/synthetic results/synthetic_teaches/new
#   python benchmarks/switch_dip.py results/synthetic_teaches/old results/synthetic_teaches/new
#
# Why does a method fall at the switch? One ablation per run (issue 22): EXPERIMENT names a
# config/benchmark.yaml experiment, TRAIN and BLEND are JSON overrides of its `train` and `blend`
# sections; sraseg experiments also need EMBED, the index stage's folder of that synthetic set
# (the blend stage runs into OUT_DIR/blend):
#   EXPERIMENT=sraseg EMBED=results/phantom_benchmark/embed TRAIN='{"teacher_mode": "train"}' \
#       benchmarks/synthetic_teaches.sh results/phantom_benchmark/synthetic results/switch/teacher_train
#
# Needs the benchmark's prepared data and raw phantom:
#   snakemake --configfile config/benchmark.yaml --cores 2 results/phantom_benchmark/prepared/slices.parquet
set -euo pipefail
synthetic=${1:?synthetic folder (images.npy)}
out=${2:?output folder}
seed=${SEED:-1337}
experiment=${EXPERIMENT:-bcp_synthetic}
ds=results/phantom_benchmark
train=$(python -c 'import json, sys; print(json.dumps({**json.loads(sys.argv[1]), "dense_val_every": 20, "dense_val_iterations": 200}))' "${TRAIN:-{\}}")
extra=()
if [[ -n "${EMBED:-}" ]]; then
    python -m sraseg blend --config config/benchmark.yaml --experiment "$experiment" --settings "${BLEND:-{\}}" \
        --synthetic-dir "$synthetic" --prepared-dir "$ds/prepared" --neighbours "$EMBED/neighbours.parquet" --embed-dir "$EMBED" --out-dir "$out/blend"
    extra=(--embed-dir "$EMBED" --blend-dir "$out/blend")
fi
python -m sraseg train --config config/benchmark.yaml --experiment "$experiment" --settings "$train" \
    --prepared-dir "$ds/prepared" --synthetic-dir "$synthetic" "${extra[@]}" --out-dir "$out" --seed "$seed"
python -m sraseg predict -m "$out" --prepared-dir "$ds/prepared" --split test -o "$out/predictions"
python -m sraseg evaluate --pred-dir "$out/predictions" --gt-dir "resources/phantom_benchmark/raw" --out-dir "$out/eval"
