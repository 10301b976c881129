"""A wheel built from the repository ships the registry: installed into a fresh virtual environment (not
editable, run from outside the source tree), `infdit info infdit-4x` and `infdit download --help` list it."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{args}: {res.stderr[-2000:]}"
    return res


def test_wheel_install_lists_the_registry(tmp_path):
    pytest.importorskip("setuptools", reason="the test extra installs setuptools to build the wheel offline")
    # Build from a copy of what the wheel is made of, so no stale build/ folder (or a file the checkout
    # happens to have) can stand in; --no-build-isolation: this environment's setuptools, no index.
    src = tmp_path / "src-copy"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", dist,
         cwd=tmp_path)
    (wheel,) = dist.glob("infdit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"infdit_cli/registry/infdit-4x.json", "infdit_cli/registry/clip-vit-l-14-datacomp.json"} <= set(names)

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    py = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel)
    # torch, open_clip, ... come from the running environment: a .pth line appends its site-packages to
    # sys.path after the venv's own. (.pth files inside it, such as the editable install's, are not run.)
    site = _run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    Path(site, "running-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "INFDIT_REGISTRY", "INFDIT_REPO")}
    env.update(INFDIT_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    where = _run(py, "-c", "import infdit_cli; print(infdit_cli.__file__)", cwd=tmp_path, env=env).stdout
    assert Path(where.strip()).is_relative_to(venv)  # the wheel's copy, not the source tree
    exe = venv / "bin" / "infdit"
    info = _run(exe, "info", "infdit-4x", cwd=tmp_path, env=env).stdout
    assert "infdit-4x: The official Inf-DiT 4x upsampler" in info
    assert "https://cloud.tsinghua.edu.cn/f/6e313f7e1236468e973b/?dl=1" in info
    assert "run `infdit download`" in info
    helptext = _run(exe, "download", "--help", cwd=tmp_path, env={**env, "COLUMNS": "200"}).stdout
    assert "infdit-4x:" in helptext and "clip-vit-l-14-datacomp:" in helptext
