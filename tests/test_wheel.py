"""A wheel built from the repository ships the registry and the selftest's fixtures: installed into a fresh
virtual environment (not editable, run from outside the source tree), `infdit info infdit-4x` and `infdit
download --help` list the registry (tests/test_selftest.py runs `infdit selftest` from the same wheel)."""

import subprocess
import zipfile
from pathlib import Path

import pytest


def _run(*args, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{args}: {res.stderr[-2000:]}"
    return res


@pytest.mark.slow
def test_wheel_install_lists_the_registry(wheel_venv, tmp_path):
    wheel, venv, env = wheel_venv
    names = set(zipfile.ZipFile(wheel).namelist())
    registry = {f"infdit_cli/weights/registry/{f}"
                for f in ("infdit-4x.json", "clip-vit-l-14-datacomp.json", "demo.json", "demo.safetensors")}
    assert registry <= names  # the repository's top-level weights/, mapped into the package
    assert {f"infdit_cli/tools/selftest_data/{f}"
            for f in ("checkpoint.pt", "config.json", "io.safetensors")} <= names
    py = venv / "bin" / "python"
    where = _run(py, "-c", "import infdit_cli; print(infdit_cli.__file__)", cwd=tmp_path, env=env).stdout
    assert Path(where.strip()).is_relative_to(venv)  # the wheel's copy, not the source tree
    exe = venv / "bin" / "infdit"
    info = _run(exe, "info", "infdit-4x", cwd=tmp_path, env=env).stdout
    assert "infdit-4x: The official Inf-DiT 4x upsampler" in info
    assert "https://cloud.tsinghua.edu.cn/f/6e313f7e1236468e973b/?dl=1" in info
    assert "run `infdit download`" in info
    demo = _run(exe, "info", "demo", cwd=tmp_path, env=env).stdout  # the packaged model, offline
    assert "demo" in demo and str(venv) in demo
    helptext = _run(exe, "download", "--help", cwd=tmp_path, env={**env, "COLUMNS": "200"}).stdout
    assert "infdit-4x:" in helptext and "clip-vit-l-14-datacomp:" in helptext
