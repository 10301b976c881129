"""The GPU check rehearsed here: `DEVICE=cpu bash benchmarks/gpu_selftest.sh run`, the script that travels.

Rows must reach the disk one by one as checks finish, the time budget must be honoured (checks predicted
to overrun it are not started, and say so), the hard limit must bound the whole script (the preflight
included), a run killed with SIGKILL must leave the rows it finished, and no missing piece may leave zero
rows: without fixtures the memory and speed rows are still written.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_selftest.sh"


def _start(out: Path, budget: int | None, **extra: str) -> subprocess.Popen:
    env = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "PYTHON": sys.executable, **extra}
    env.pop("TIME_BUDGET", None)
    if budget is not None:
        env["TIME_BUDGET"] = str(budget)
    return subprocess.Popen(["bash", str(SCRIPT), "run"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _checks(path: Path) -> list[dict]:
    return [r for r in _records(path) if r["kind"] == "check"]


@pytest.mark.slow
def test_rehearsal_without_fixtures_streams_rows_within_the_time_budget(tmp_path):
    """Without fixtures (an empty --fixtures folder) and with a time budget that fits some of the toy run:
    the parity and bf16 rows say why they are skipped (no zero-row outcome), the memory row at 512² and what
    else fits is measured, rows reach the disk one by one, and the budget is honoured check by check. (The
    rows' values are held by tests/test_selftest.py's whole run; the script's first row with fixtures by the
    killed rehearsal below.)"""
    (tmp_path / "empty").mkdir()
    budget = 25  # the 512² memory row fits (about 10 s here), the whole toy run (about 60 s) does not
    proc = _start(tmp_path, budget, FIXTURES=str(tmp_path / "empty"))
    seen = []  # number of check rows on disk, each time it changed while the script was still running
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        n = len(_checks(tmp_path / "rows.jsonl"))
        if not seen or n != seen[-1]:
            seen.append(n)
        time.sleep(0.1)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out
    assert (tmp_path / "preflight.txt").read_text().count("FAILED") == 0
    records = _records(tmp_path / "rows.jsonl")
    assert records[0]["kind"] == "start" and records[0]["time_budget"] == budget
    assert records[-1]["kind"] == "end" and records[-1]["passed"] is True
    checks = _checks(tmp_path / "rows.jsonl")
    assert any(0 < n < len(checks) for n in seen), seen  # rows were on disk before the run ended
    fixture_rows = [c for c in checks if c["group"] in ("parity", "bf16")]
    assert len(fixture_rows) == 4 and all(c["status"] == "skip" and "no fixtures" in c["value"]
                                          for c in fixture_rows)
    ran = [c for c in checks if c["status"] != "skip"]
    assert ran[0]["name"].startswith("peak 512²") and ran[0]["status"] == "pass"
    assert ran[0]["numbers"]["measured"] > 0
    assert all(c["status"] in ("pass", "info") for c in ran)
    skipped = [c for c in checks if c["value"].startswith("not run: predicted")]
    assert skipped and all(c["seconds"] == 0 for c in skipped)
    # The budget was honoured check by check: a check ran only where its prediction fitted what was left,
    # and was skipped only where it did not (how long a check then takes depends on this machine's load).
    fits = [c["numbers"]["started_s"] + c["numbers"]["predicted_s"] <= budget for c in checks]
    assert all(f for f, c in zip(fits, checks) if c in ran) and \
        not any(f for f, c in zip(fits, checks) if c in skipped)
    assert "not run: time budget" in (tmp_path / "report.md").read_text()


def test_limits_keep_the_script_under_the_device_limit():
    """A device command may run 600 s: the default budget (360 s) plus the worst preflight (60 s) and the
    slack (60 s) stays under the default hard limit (560 s), which the selftest's kill (SIGKILL 10 s after
    SIGTERM at what is left of it) never passes."""
    text = SCRIPT.read_text()
    num = {k: int(re.search(rf'{k}:-(\d+)', text).group(1)) for k in ("TIME_BUDGET", "HARD_LIMIT", "SLACK")}
    assert num == {"TIME_BUDGET": 360, "HARD_LIMIT": 560, "SLACK": 60}
    waits = [int(m) for m in re.findall(r"^\s*(?:if ! \S+ )?(?:DEVICE=\S+ )?timeout (\d+) ", text, re.M)]
    assert waits == [60]  # the preflight
    assert num["TIME_BUDGET"] + sum(waits) + num["SLACK"] < num["HARD_LIMIT"] < 600
    assert 'left=$((hard - 10 - SECONDS))' in text and 'timeout -k 10 "$left"' in text


@pytest.mark.slow
def test_rehearsal_killed_mid_run_leaves_its_rows(tmp_path):
    # the default budget (360 s), cut to what a 400 s hard limit leaves after the preflight, less 60 s
    proc = _start(tmp_path, None, HARD_LIMIT="400")
    rows = tmp_path / "rows.jsonl"
    deadline = time.monotonic() + 480  # a bound for a loaded machine: the loop ends at the first row
    while not _checks(rows) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    # one by one: the first check's row is on disk while the second check (the 20-step sample) still runs
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    # `timeout` leads a process group of its own, which the kill above does not reach: end the selftest
    # it started too (its command line names this test's folder), or it runs on beside the later tests
    subprocess.run(["pkill", "-KILL", "-f", str(tmp_path)], check=False)
    records = _records(rows)  # every line whole: each row was written, flushed and fsynced at once
    assert records[0]["kind"] == "start" and records[-1]["kind"] == "check"
    assert 300 <= records[0]["time_budget"] <= 330
    checks = _checks(rows)
    assert checks[0]["name"] == "fp32 denoiser call vs official" and checks[0]["status"] == "pass"
    report = (tmp_path / "report.md").read_text()
    assert all(c["name"] in report for c in checks)
    assert not (tmp_path / "report.json").read_text().strip()  # the whole report never came
