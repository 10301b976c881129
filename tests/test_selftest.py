"""`infdit selftest --device cpu`: every check runs at toy sizes and none fails (CI runs this)."""

import json

from conftest import run_cli


def test_selftest_cpu_passes(tmp_path):
    report = tmp_path / "selftest.md"
    res = run_cli("selftest", "--device", "cpu", "--json", "-o", report)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    data = json.loads(res.stdout)
    rows = data["checks"]
    assert data["passed"] is True and data["profile"] == "toy"
    assert [r["name"] for r in rows if r["status"] == "fail"] == []
    groups = {g: [r for r in rows if r["group"] == g] for g in ("parity", "bf16", "memory", "speed", "plan")}
    # The checks with a criterion really ran and passed (not skipped): 2 parity + 3 block + cache, 3 bf16,
    # one memory row per toy size.
    assert [r["status"] for r in groups["parity"]] == ["pass"] * 6
    assert [r["status"] for r in groups["bf16"]] == ["pass"] * 3
    assert len(groups["memory"]) == 2 and all(r["status"] == "pass" for r in groups["memory"])
    assert all(r["numbers"]["ratio"] <= 1.5 for r in groups["bf16"])
    assert all(r["numbers"]["value"] <= 1e-5 for r in groups["parity"])
    assert groups["speed"][0]["numbers"]["block_s"] > 0 and groups["plan"][0]["numbers"]["seconds"] > 0
    text = report.read_text()
    assert text.startswith("## `infdit selftest` on cpu") and text.count("\n| ") == len(rows) + 1


def test_selftest_missing_fixtures_is_one_line(tmp_path):
    res = run_cli("selftest", "--device", "cpu", "--fixtures", tmp_path / "nowhere")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--fixtures" in lines[0]


def test_selftest_never_overwrites_a_report(tmp_path):
    out = tmp_path / "r.md"
    out.write_text("precious")
    res = run_cli("selftest", "--device", "cpu", "-o", out)
    assert res.returncode == 1 and "--overwrite" in res.stderr
    assert out.read_text() == "precious"
