#!/usr/bin/env bash
# The one prepared GPU check: `infdit selftest` on CUDA, its report written to $OUT (or ./gpu-report).
#
#   bash benchmarks/gpu_selftest.sh prepare   # here (with network): wheels and both fixtures into the tree
#   bash benchmarks/gpu_selftest.sh run       # there: install the wheels, run the selftest
#   DEVICE=cpu bash benchmarks/gpu_selftest.sh run   # the same script at toy sizes (to check it here)
#
# `prepare` puts open_clip_torch, ftfy and wcwidth wheels (the GPU machine has torch, timm and the rest,
# and no network) in .whl/ and both fixtures in .gpu/fixtures/, and lists both folders in
# .git/info/exclude: a device run carries them (`carry: [".whl", ".gpu"]`, about 33 MiB). `run` installs
# the wheels into /tmp/site and runs the selftest from src/ (about 8 minutes on an H100-class GPU; the
# timeout leaves room to print the report).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-run}" in
prepare)
    for d in /.whl/ /.gpu/; do grep -qxF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
    rm -rf .whl .gpu && mkdir -p .whl .gpu/fixtures
    for w in open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$w"
    done
    cp -r ../shared/fixtures/upstream-a ../shared/fixtures/upstream-a-bf16 .gpu/fixtures/
    du -sh .whl .gpu
    ;;
run)
    out="${OUT:-gpu-report}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl
    export PYTHONPATH="src:/tmp/site" HF_HUB_OFFLINE=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true
    rc=0
    timeout 540 python3 -m infdit_cli selftest --device "${DEVICE:-cuda}" --fixtures .gpu/fixtures -o "$out/report.md" \
        --json > "$out/report.json" 2> "$out/stderr.txt" || rc=$?
    cat "$out/report.md" 2>/dev/null || tail -5 "$out/stderr.txt"
    exit $rc
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
