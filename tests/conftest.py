import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from infdit_cli.config import PRESETS  # noqa: E402
from infdit_cli.weights import random_model, save_model_file  # noqa: E402

DATA = Path(__file__).parent / "data" / "upstream-a"  # checkpoint.pt, config.json: links into the package's
# copy (src/infdit_cli/selftest_data, which `infdit selftest` reads); io.safetensors here holds the other keys
PACKAGED = Path(__file__).resolve().parents[1] / "src" / "infdit_cli" / "selftest_data"
TORCH_DEVICE = os.environ.get("TORCH_DEVICE", "cpu")


def run_cli(*args: str, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run the installed `infdit` command."""
    exe = Path(sys.executable).with_name("infdit")
    res = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"infdit {' '.join(map(str, args))} failed ({res.returncode}):\n{res.stderr}")
    return res


def default_signals() -> None:
    """preexec_fn for children that get signals: SIGINT (and SIGTERM, SIGHUP) at their defaults, whatever
    this process inherited (a background job of a non-interactive shell starts with SIGINT ignored)."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


@pytest.fixture(scope="session")
def official_file(tmp_path_factory) -> Path:
    """The upstream-a checkpoint converted by the installed `infdit convert` command."""
    out = tmp_path_factory.mktemp("official") / "upstream-a.safetensors"
    run_cli("convert", DATA / "checkpoint.pt", "-o", out, "--clip-head-width", "32", check=True)
    return out


@pytest.fixture(scope="session")
def official_model(official_file):
    from infdit_cli.weights import load_model

    return load_model(official_file, device=TORCH_DEVICE, dtype=torch.float32)


@pytest.fixture(scope="session")
def io():
    from safetensors.torch import load_file

    packaged = {k: v for k, v in load_file(str(PACKAGED / "io.safetensors")).items() if not k.startswith("bf16_")}
    return {**packaged, **load_file(str(DATA / "io.safetensors"))}  # every key of upstream-a, each stored once


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory):
    """A wheel built from the repository, installed (not editable) into a fresh virtual environment whose
    other packages (torch, open_clip, ...) come from the running one: (wheel, venv, env for running it
    outside the source tree). Built once per session (tests/test_wheel.py, tests/test_selftest.py)."""
    import shutil
    import sysconfig

    pytest.importorskip("setuptools", reason="the test extra installs setuptools to build the wheel offline")

    def run(*args, **kw):
        res = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
        assert res.returncode == 0, f"{args}: {res.stderr[-2000:]}"
        return res

    root, tmp = Path(__file__).resolve().parents[1], tmp_path_factory.mktemp("wheel")
    # Build from a copy of what the wheel is made of, so no stale build/ folder (or a file the checkout
    # happens to have) can stand in; --no-build-isolation: this environment's setuptools, no index.
    src = tmp / "src-copy"
    shutil.copytree(root / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    dist = tmp / "dist"
    run(sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", dist, cwd=tmp)
    (wheel,) = dist.glob("infdit-*.whl")
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    py = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel)
    # torch, open_clip, ... come from the running environment: a .pth line appends its site-packages to
    # sys.path after the venv's own. (.pth files inside it, such as the editable install's, are not run.)
    site = run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    Path(site, "running-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "INFDIT_REGISTRY", "INFDIT_REPO")}
    env.update(INFDIT_CACHE=str(tmp / "cache"), HF_HOME=str(tmp / "hf"), HF_HUB_OFFLINE="1")
    return wheel, venv, env


@pytest.fixture(scope="session")
def tiny_config():
    return PRESETS["tiny"]


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    return random_model(tiny_config, seed=0)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory, tiny_model) -> Path:
    """A real safetensors file of the tiny random model, so tests run the real loading path."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save_model_file(path, tiny_model.state_dict(), tiny_model.config)
    return path


# A release server on 127.0.0.1 serving the official-format fixture checkpoint (test_download, test_boundaries).
CKPT = (DATA / "checkpoint.pt").read_bytes()
RELEASE = "/f/6e313f7e1236468e973b/"  # the shape of the official link: a path plus ?dl=1


@pytest.fixture
def release(tmp_path):
    """(fake server, the release URL, an environment with a private cache and the Hub online, tmp_path)."""
    from hubserver import FakeHub

    fake = FakeHub(plain={RELEASE: CKPT})
    base = fake.start()
    env = {**os.environ, "INFDIT_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": base}
    for k in ("INFDIT_REPO", "INFDIT_WEIGHTS", "INFDIT_REGISTRY"):
        env.pop(k, None)
    yield fake, f"{base}{RELEASE}?dl=1", env, tmp_path
    try:
        fake.stop()
    except Exception:
        pass
