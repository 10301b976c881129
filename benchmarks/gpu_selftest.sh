#!/usr/bin/env bash
# The one prepared GPU check: `infdit selftest` on CUDA, every row kept under $OUT as it finishes.
#
#   bash benchmarks/gpu_selftest.sh prepare   # here (with network): the wheels the GPU machine lacks
#   bash benchmarks/gpu_selftest.sh run       # there: preflight, then the selftest within a time budget
#   DEVICE=cpu bash benchmarks/gpu_selftest.sh run   # the same script at toy sizes (the test suite runs it)
#
# `prepare` puts open_clip_torch, ftfy and wcwidth wheels (the GPU machine has torch, timm and the rest,
# and no network) in .whl/ and lists it in git's info/exclude: a device run carries it (`carry:
# [".whl"]`, about 2 MiB). The fixtures travel with the package (src/infdit_cli/tools/selftest_data). It works
# from any checkout (or worktree, or unpacked copy) and any number of times.
#
# `run` writes, under $OUT (default ./gpu-report):
#   preflight.txt  imports, versions, GPU and free memory, host memory, a 1 GiB pinned-memory probe
#                  (about 5 s; stops here, exit 4, where torch or infdit itself cannot be imported; a
#                  missing open_clip only skips the parity and bf16 rows)
#   rows.jsonl     one JSON line per finished check, appended and fsynced the moment it finishes
#   report.md      the Markdown table, rewritten after every check (a killed run keeps what finished)
#   report.json    the whole report (only when the selftest ends by itself)
#   stderr.txt     one line per check as it finishes, and any error
# TIME_BUDGET (seconds, default 360) is the selftest's --time-budget: checks predicted to overrun it are
# not started and say so. HARD_LIMIT (seconds, default 560) bounds the whole script, pip and the
# preflight included: the selftest is killed at HARD_LIMIT - 10 s (SIGTERM, then SIGKILL 10 s later), and
# its budget is cut to what is left after the preflight less SLACK (default 60 s: room for a check that
# overruns its prediction). A device command may run 600 s.
# FIXTURES=DIR passes --fixtures DIR (the rehearsals use an empty folder).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"

case "${1:-run}" in
prepare)
    exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)  # a worktree's .git is a file
    if [ -n "$exclude" ]; then
        mkdir -p "$(dirname "$exclude")"
        grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
    fi
    [ -e .gpu ] && chmod -R u+w .gpu && rm -rf .gpu  # an older prepare's read-only fixture copies
    rm -rf .whl && mkdir -p .whl
    for w in open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13; do
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$w"
    done
    du -sh .whl
    ;;
limits)  # what `run` would use, without running (tests/test_gpu_script.py)
    echo "time_budget=${TIME_BUDGET:-360} hard_limit=${HARD_LIMIT:-560}"
    ;;
run)
    out="${OUT:-gpu-report}"
    budget="${TIME_BUDGET:-360}"
    hard="${HARD_LIMIT:-560}"
    SECONDS=0
    mkdir -p "$out"
    if [ -d .whl ] && [ "${INSTALL_WHEELS:-1}" = 1 ]; then
        timeout 120 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || echo "pip install of .whl failed: open_clip may be missing" >&2
    fi
    # `import transformers` fails at once, as in CI (open_clip imports it where installed: seconds per
    # process, and a path no test runs).
    stub=$(mktemp -d)
    mkdir -p "$stub/transformers"
    echo 'raise ImportError("transformers is stubbed out by benchmarks/gpu_selftest.sh, as in CI")' \
        > "$stub/transformers/__init__.py"
    # The caller's PYTHONPATH before the wheels: an import stub there (the rehearsal's open_clip) wins.
    export PYTHONPATH="src:$stub${PYTHONPATH:+:$PYTHONPATH}:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
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
    rm -rf "$stub"
    cat "$out/report.md" 2>/dev/null || tail -5 "$out/stderr.txt"
    exit $rc
    ;;
*)
    echo "usage: $0 prepare|run|limits" >&2
    exit 2
    ;;
esac
