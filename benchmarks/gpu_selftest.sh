#!/usr/bin/env bash
# The one prepared GPU check: `infdit selftest` on CUDA, every row kept under $OUT as it finishes.
#
#   bash benchmarks/gpu_selftest.sh run       # there: preflight, then the selftest within a time budget
#   DEVICE=cpu bash benchmarks/gpu_selftest.sh run   # the same script at toy sizes (the test suite runs it)
#
# It needs nothing the GPU machine lacks (torch, numpy, Pillow, safetensors, typer, rich, huggingface_hub;
# the CLIP tower is infdit's own), and the fixtures travel with the package
# (src/infdit_cli/tools/selftest_data). It works from any checkout (or worktree, or unpacked copy) and any
# number of times.
#
# `run` writes, under $OUT (default ./gpu-report):
#   preflight.txt  imports, versions, GPU and free memory, host memory, a 1 GiB pinned-memory probe
#                  (about 5 s; stops here, exit 4, where a package it needs cannot be imported)
#   rows.jsonl     one JSON line per finished check, appended and fsynced the moment it finishes
#   report.md      the Markdown table, rewritten after every check (a killed run keeps what finished)
#   report.json    the whole report (only when the selftest ends by itself)
#   stderr.txt     one line per check as it finishes, and any error
# TIME_BUDGET (seconds, default 360) is the selftest's --time-budget: checks predicted to overrun it are
# not started and say so. HARD_LIMIT (seconds, default 560) bounds the whole script, the preflight
# included: the selftest is killed at HARD_LIMIT - 10 s (SIGTERM, then SIGKILL 10 s later), and
# its budget is cut to what is left after the preflight less SLACK (default 60 s: room for a check that
# overruns its prediction). A device command may run 600 s.
# FIXTURES=DIR passes --fixtures DIR (the rehearsals use an empty folder).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"

case "${1:-run}" in
limits)  # what `run` would use, without running (tests/test_gpu_script.py)
    echo "time_budget=${TIME_BUDGET:-360} hard_limit=${HARD_LIMIT:-560}"
    ;;
run)
    out="${OUT:-gpu-report}"
    budget="${TIME_BUDGET:-360}"
    hard="${HARD_LIMIT:-560}"
    SECONDS=0
    mkdir -p "$out"
    export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    # Before CUDA initialises: the caching allocator grows segments in place instead of fragmenting.
    export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
    # The GPU machine's memory grows on demand (MemTotal starts low): plan its host side from what it has.
    [ "${DEVICE:-cuda}" = cpu ] || export INFDIT_HOST_MEMORY="${INFDIT_HOST_MEMORY:-96GB}"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true
    if ! DEVICE="${DEVICE:-cuda}" timeout 60 "$py" benchmarks/gpu_preflight.py > "$out/preflight.txt" 2>&1; then
        cat "$out/preflight.txt"
        exit 4
    fi
    left=$((hard - 10 - SECONDS))  # the selftest's hard limit: SIGKILL comes 10 s after it
    slack="${SLACK:-60}"  # for a check that overruns its prediction
    [ "$budget" -le $((left - slack)) ] || budget=$((left - slack))
    if [ "$budget" -lt 1 ]; then
        echo "no time left for the selftest: ${SECONDS} s spent, hard limit ${hard} s" >&2
        exit 5
    fi
    fixtures=()
    [ -z "${FIXTURES:-}" ] || fixtures=(--fixtures "$FIXTURES")
    rc=0
    timeout -k 10 "$left" "$py" -m infdit_cli selftest --device "${DEVICE:-cuda}" "${fixtures[@]}" \
        --time-budget "$budget" --jsonl "$out/rows.jsonl" -o "$out/report.md" --overwrite --json \
        > "$out/report.json" 2> "$out/stderr.txt" || rc=$?
    cat "$out/report.md" 2>/dev/null || tail -5 "$out/stderr.txt"
    exit $rc
    ;;
*)
    echo "usage: $0 run|limits" >&2
    exit 2
    ;;
esac
