#!/usr/bin/env bash
# The one prepared GPU check: `infdit selftest` on CUDA, every row kept under $OUT as it finishes.
#
#   bash benchmarks/gpu_selftest.sh prepare   # here (with network): wheels and both fixtures into the tree
#   bash benchmarks/gpu_selftest.sh run       # there: preflight, then the selftest within a time budget
#   DEVICE=cpu bash benchmarks/gpu_selftest.sh run   # the same script at toy sizes (the test suite runs it)
#
# `prepare` puts open_clip_torch, ftfy and wcwidth wheels (the GPU machine has torch, timm and the rest,
# and no network) in .whl/ and both fixtures in .gpu/fixtures/, and lists both folders in
# .git/info/exclude: a device run carries them (`carry: [".whl", ".gpu"]`, about 33 MiB).
#
# `run` writes, under $OUT (default ./gpu-report):
#   preflight.txt  imports, versions, GPU and free memory, host memory (about 5 s; stops here on a
#                  missing package, exit 4)
#   rows.jsonl     one JSON line per finished check, appended and fsynced the moment it finishes
#   report.md      the Markdown table, rewritten after every check (a killed run keeps what finished)
#   report.json    the whole report (only when the selftest ends by itself)
#   stderr.txt     one line per check as it finishes, and any error
# TIME_BUDGET (seconds, default 420) is the selftest's --time-budget: checks predicted to overrun it are
# not started and say so. The hard limit is TIME_BUDGET + 120 s.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"

case "${1:-run}" in
prepare)
    for d in /.whl/ /.gpu/; do grep -qxF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
    rm -rf .whl .gpu && mkdir -p .whl .gpu/fixtures
    for w in open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13; do
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$w"
    done
    cp -r ../shared/fixtures/upstream-a ../shared/fixtures/upstream-a-bf16 .gpu/fixtures/
    du -sh .whl .gpu
    ;;
run)
    out="${OUT:-gpu-report}"
    budget="${TIME_BUDGET:-420}"
    mkdir -p "$out"
    if [ -d .whl ] && [ "${INSTALL_WHEELS:-1}" = 1 ]; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl
    fi
    export PYTHONPATH="src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    # The GPU machine's memory grows on demand (MemTotal starts low): plan its host side from what it has.
    [ "${DEVICE:-cuda}" = cpu ] || export INFDIT_HOST_MEMORY="${INFDIT_HOST_MEMORY:-96GB}"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true
    if ! timeout 60 "$py" benchmarks/gpu_preflight.py > "$out/preflight.txt" 2>&1; then
        cat "$out/preflight.txt"
        exit 4
    fi
    fixtures=()
    [ -d .gpu/fixtures ] && fixtures=(--fixtures .gpu/fixtures)
    rc=0
    timeout -k 10 "$((budget + 120))" "$py" -m infdit_cli selftest --device "${DEVICE:-cuda}" "${fixtures[@]}" \
        --time-budget "$budget" --jsonl "$out/rows.jsonl" -o "$out/report.md" --overwrite --json \
        > "$out/report.json" 2> "$out/stderr.txt" || rc=$?
    cat "$out/report.md" 2>/dev/null || tail -5 "$out/stderr.txt"
    exit $rc
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
