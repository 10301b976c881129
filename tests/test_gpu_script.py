"""The GPU check rehearsed here: `DEVICE=cpu bash benchmarks/gpu_selftest.sh run`, the script that travels.

Rows must reach the disk one by one as checks finish, the time budget must be honoured (checks predicted
to overrun it are not started, and say so), and a run killed with SIGKILL must leave the rows it finished.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_selftest.sh"


def _start(out: Path, budget: int) -> subprocess.Popen:
    env = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "TIME_BUDGET": str(budget), "PYTHON": sys.executable,
           "INSTALL_WHEELS": "0"}
    return subprocess.Popen(["bash", str(SCRIPT), "run"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _checks(path: Path) -> list[dict]:
    return [r for r in _records(path) if r["kind"] == "check"]


def test_rehearsal_streams_rows_within_the_time_budget(tmp_path):
    budget = 40  # the parity rows fit (about 15 s here), the whole toy run (about 50 s) does not
    proc = _start(tmp_path, budget)
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
    ran = [c for c in checks if c["status"] != "skip"]
    assert ran[0]["name"] == "fp32 denoiser call vs official" and ran[0]["status"] == "pass"
    assert all(c["status"] in ("pass", "info") for c in ran)
    skipped = [c for c in checks if c["value"].startswith("not run: predicted")]
    assert skipped and all(c["seconds"] == 0 for c in skipped)
    # The budget was honoured check by check: a check ran only where its prediction fitted what was left,
    # and was skipped only where it did not (how long a check then takes depends on this machine's load).
    fits = [c["numbers"]["started_s"] + c["numbers"]["predicted_s"] <= budget for c in checks]
    assert all(f for f, c in zip(fits, checks) if c in ran) and not any(f for f, c in zip(fits, checks) if c in skipped)
    assert "not run: time budget" in (tmp_path / "report.md").read_text()


def test_rehearsal_killed_mid_run_leaves_its_rows(tmp_path):
    proc = _start(tmp_path, 600)
    rows = tmp_path / "rows.jsonl"
    deadline = time.monotonic() + 240
    seen = []
    while len(_checks(rows)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        seen.append(len(_checks(rows)))
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    assert 1 in seen  # one by one: the first check's row was on disk while the second check still ran
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    records = _records(rows)  # every line whole: each row was written, flushed and fsynced at once
    assert records[0]["kind"] == "start" and records[-1]["kind"] == "check"
    checks = _checks(rows)
    assert len(checks) >= 2 and checks[0]["status"] == "pass"
    report = (tmp_path / "report.md").read_text()
    assert all(c["name"] in report for c in checks)
    assert not (tmp_path / "report.json").read_text().strip()  # the whole report never came
