#!/usr/bin/env bash
# The GPU check of issue 12 §2, as one prepared script for a lent GPU machine (see
# bench/gpu.py for what it measures). That machine has Python 3.12 with torch but cannot
# reach a package registry, so the engine's other imports travel as wheels in .whl/
# (git-ignored), fetched here first:
#
#   bench/gpu.sh fetch          # here: download the wheels into .whl/
#   bench/gpu.sh run OUTDIR     # there (the device tool: carry .whl): about 3 minutes
#
# `run` writes OUTDIR/gpu.json (bench/gpu.py's output, with speed-ups over this repo's CPU
# baseline bench/results/gpu-cpu.json), OUTDIR/gpu-share.json (two processes training the
# small detector at 32 px on the one GPU at once, against one alone), OUTDIR/nvidia-smi.txt
# and OUTDIR/gpu.log.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(kornia==0.9.0 kornia_rs==0.2.0 pydantic==2.14.4 pydantic_core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5)

case "${1:-}" in
fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
    ;;
run)
    out="${2:?usage: bench/gpu.sh run OUTDIR}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
    python3 -m bench.gpu --device cuda --out "$out/gpu.json" 2>&1 | tee "$out/gpu.log"
    # Several small trials on one GPU at once: does sharing beat one at a time?
    python3 -m bench.gpu --device cuda --only small:32 --processes 2 \
        --out "$out/gpu-share.json" 2>&1 | tee -a "$out/gpu.log"
    ;;
*)
    echo "usage: bench/gpu.sh fetch | run OUTDIR" >&2
    exit 2
    ;;
esac
