import contextlib
import locale
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One calibration cache for the session, never the user's (~/.cache/huggingface/infdit): set before any
# test module builds its environment from os.environ, so subprocesses get it too.
SESSION_CACHE = tempfile.mkdtemp(prefix="infdit-test-cache-")
os.environ["INFDIT_CACHE"] = SESSION_CACHE
# and one table of measured rates for every test and process, also those with a cache of their own (a
# first download, the wheel): each model shape is measured once a session, not once per fresh cache
# (test_calibrate's tests keep theirs in their own caches)
os.environ["INFDIT_CALIBRATION"] = os.path.join(SESSION_CACHE, "calibration.json")

from infdit_cli.engine.storage import _COMPACTED, _GONE  # noqa: E402
from infdit_cli.model.config import PRESETS  # noqa: E402
from infdit_cli.model.infdit import random_model  # noqa: E402
from infdit_cli.weights.format import save_model_file  # noqa: E402

DATA = Path(__file__).parent / "data" / "upstream-a"  # checkpoint.pt, config.json: links into the package's
# copy (src/infdit_cli/tools/selftest_data, which `infdit selftest` reads); io.safetensors here holds the
# other keys
PACKAGED = Path(__file__).resolve().parents[1] / "src" / "infdit_cli" / "tools" / "selftest_data"
TORCH_DEVICE = os.environ.get("TORCH_DEVICE", "cpu")
INFDIT = Path(sys.executable).with_name("infdit")  # the installed entry point


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


def run_cli(*args, check: bool = False, process: bool = False, env: dict | None = None, cwd=None,
            **kw) -> subprocess.CompletedProcess:
    """`infdit ARGS`: by default in this process, through the CLI's own `main` (`run_here`), as the
    installed command would run it; `process=True`: the installed `infdit` executable in a new process
    (for what needs the process boundary: signals, locks between processes, the entry point itself)."""
    if process:
        res = subprocess.run([str(INFDIT), *map(str, args)], check=False, capture_output=True, text=True,
                             env=env, cwd=cwd, **kw)
    else:
        if kw:
            raise TypeError(f"run_cli in-process takes no {sorted(kw)}: pass process=True")
        res = run_here(*args, env=env, cwd=cwd)
    if check and res.returncode != 0:
        raise AssertionError(f"infdit {' '.join(map(str, args))} failed ({res.returncode}):\n{res.stderr}")
    return res


# Environment variables read when a module is imported: a different value needs a new process.
_READ_AT_IMPORT = ("INFDIT_DOWNLOAD_TIMEOUT",)
# A fresh interpreter's warning filters (no -W, no PYTHONWARNINGS; pytest adds its own).
_FRESH_FILTERS = (("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None),
                  ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
                  ("ignore", ResourceWarning, None))
_FRESH_SEED = 67280421310721  # torch's default generator's seed in a new process


def run_here(*args, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """`infdit ARGS` through `infdit_cli.cli.app.main` in this process, with what a new process would have:
    `env` as the whole environment (huggingface_hub's constants recomputed from it), `cwd`, sys.argv, stdout
    and stderr captured at the file descriptors (C-level writes included) and decoded as `subprocess.run(...,
    text=True)` does, a fresh interpreter's warning filters shown on stderr, logging's stream handlers and
    last resort on the captured stderr, torch's seed and thread count, storage's per-process marker records.
    All of it is restored afterwards, whatever the command changed (-v writes INFDIT_DEBUG, say)."""
    from infdit_cli.cli.app import main

    args = [str(a) for a in args]
    with contextlib.ExitStack() as stack:
        saved_env = dict(os.environ)
        stack.callback(lambda: (os.environ.clear(), os.environ.update(saved_env)))
        if env is not None:
            for k in _READ_AT_IMPORT:
                if env.get(k) != saved_env.get(k):
                    raise ValueError(f"{k} is read at import: run this case with process=True")
            os.environ.clear()
            os.environ.update(env)
            _hub_constants(stack)
        if cwd is not None:
            stack.callback(os.chdir, os.getcwd())
            os.chdir(cwd)
        saved_argv = sys.argv
        stack.callback(setattr, sys, "argv", saved_argv)
        sys.argv = ["infdit", *args]
        main_module = sys.modules["__main__"]  # click names the program from it: `python -m pytest` is not us
        saved_package = getattr(main_module, "__package__", None)
        stack.callback(setattr, main_module, "__package__", saved_package)
        main_module.__package__ = None
        stack.enter_context(torch.random.fork_rng(devices=[]))
        torch.manual_seed(_FRESH_SEED)
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        saved_records = {k: set(v) for k, v in _GONE.items()}, dict(_COMPACTED)
        stack.callback(_restore_records, *saved_records)
        _GONE.clear()
        _COMPACTED.clear()
        threads = set(threading.enumerate())
        out, err = stack.enter_context(_captured())
        stack.enter_context(_fresh_warnings())
        stack.enter_context(_logging_to(sys.stderr))
        try:
            main()
            code = 0
        except SystemExit as e:  # as the interpreter exits
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        for t in set(threading.enumerate()) - threads:  # the interpreter waits for these before it exits
            if not t.daemon:
                t.join(timeout=60)
    return subprocess.CompletedProcess(["infdit", *args], code, out.text, err.text)


def _restore_records(gone, compacted) -> None:
    _GONE.clear()
    _GONE.update(gone)
    _COMPACTED.clear()
    _COMPACTED.update(compacted)


def _hub_constants(stack: contextlib.ExitStack) -> None:
    """huggingface_hub reads HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE, ... into `huggingface_hub.constants` at
    import (and its modules read them from there): recomputed from the current environment."""
    import importlib.util

    from huggingface_hub import constants

    spec = importlib.util.spec_from_file_location("_infdit_test_hf_constants", constants.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    for name, value in vars(fresh).items():
        if name.isupper() and getattr(constants, name, None) != value:
            stack.callback(setattr, constants, name, getattr(constants, name))
            setattr(constants, name, value)


class _Text:
    text = ""


@contextlib.contextmanager
def _captured():
    """File descriptors 1 and 2 (and sys.stdout, sys.stderr over them) into temporary files; on exit, their
    text as `subprocess.run(..., text=True)` gives it (locale encoding, universal newlines)."""
    encoding = locale.getpreferredencoding(False)
    saved_sys = sys.stdout, sys.stderr
    results = _Text(), _Text()
    with tempfile.TemporaryFile() as f1, tempfile.TemporaryFile() as f2:
        saved_fds = []
        try:
            for f, fd in ((f1, 1), (f2, 2)):
                saved_sys[fd - 1].flush()
                saved_fds.append(os.dup(fd))
                os.dup2(f.fileno(), fd)
            # as the interpreter opens them: strict stdout, backslashreplace stderr, line-buffered
            sys.stdout = open(1, "w", buffering=1, encoding=encoding, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, encoding=encoding, errors="backslashreplace",  # noqa: SIM115
                              closefd=False)
            yield results
        finally:
            for stream in (sys.stdout, sys.stderr):
                if stream not in saved_sys:
                    with contextlib.suppress(Exception):
                        stream.flush()
            sys.stdout, sys.stderr = saved_sys
            for fd, saved in zip((1, 2), saved_fds):
                os.dup2(saved, fd)
                os.close(saved)
        for f, result in zip((f1, f2), results):
            f.seek(0)
            result.text = f.read().decode(encoding).replace("\r\n", "\n").replace("\r", "\n")


@contextlib.contextmanager
def _fresh_warnings():
    """A new interpreter's warning filters, each warning printed to (the current) sys.stderr."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for action, category, module in reversed(_FRESH_FILTERS):
            warnings.filterwarnings(action, category=category, module=module or "")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        yield


@contextlib.contextmanager
def _logging_to(stream):
    """Logging as in a new process: the root logger without pytest's handlers (so a record reaches
    logging's last resort, which writes to sys.stderr), and libraries' plain stream handlers (made when they
    were imported, on the stderr of that moment) writing to `stream`."""
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    plain = [h for h in (r() for r in list(logging._handlerList)) if type(h) is logging.StreamHandler]
    saved_streams = [h.stream for h in plain]
    root.handlers = []
    for h in plain:
        h.setStream(stream)
    try:
        yield
    finally:
        root.handlers = saved_handlers
        for h, s in zip(plain, saved_streams):
            h.setStream(s)


def default_signals() -> None:
    """preexec_fn for children that get signals: SIGINT (and SIGTERM, SIGHUP) at their defaults, whatever
    this process inherited (a background job of a non-interactive shell starts with SIGINT ignored)."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


@pytest.fixture(scope="session")
def official_file(tmp_path_factory) -> Path:
    """The upstream-a checkpoint converted by `infdit convert`."""
    out = tmp_path_factory.mktemp("official") / "upstream-a.safetensors"
    run_cli("convert", DATA / "checkpoint.pt", "-o", out, "--clip-head-width", "32", check=True)
    return out


@pytest.fixture(scope="session")
def official_model(official_file):
    from infdit_cli.weights.format import load_model

    return load_model(official_file, device=TORCH_DEVICE, dtype=torch.float32)


@pytest.fixture(scope="session")
def io():
    from safetensors.torch import load_file

    packaged = {k: v for k, v in load_file(str(PACKAGED / "io.safetensors")).items()
                if not k.startswith("bf16_")}
    # every key of upstream-a, each stored once
    return {**packaged, **load_file(str(DATA / "io.safetensors"))}


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
    for tree in ("src", "weights"):  # weights/: the registry, installed as infdit_cli.weights.registry
        shutil.copytree(root / tree, src / tree, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    dist = tmp / "dist"
    run(sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", dist,
        cwd=tmp)
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


# The reference job: an uninterrupted, checkpoint-free run of the installed command's path (test_resume,
# test_disk_state compare every stopped, resumed or damaged run against its bytes).
JOB_STEPS = 4
JOB_ARGS = ["--scale", "8", "--steps", str(JOB_STEPS), "--device", "cpu"]  # tiny model: 4x then 2x


def rgb_image(h, w, seed=0):
    import numpy as np

    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="session")
def reference_job(tmp_path_factory, tiny_weights) -> tuple[Path, bytes]:
    """(an input, the bytes of `infdit upscale` on it with JOB_ARGS and --no-checkpoint), once a session."""
    from PIL import Image

    d = tmp_path_factory.mktemp("job")
    src = d / "in.png"
    Image.fromarray(rgb_image(12, 14)).save(src)
    ref = d / "ref.png"
    run_cli("upscale", src, "-o", ref, *JOB_ARGS, "--weights", tiny_weights, "--no-checkpoint", check=True)
    return src, ref.read_bytes()


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


# A release server on 127.0.0.1 serving the official-format fixture checkpoint (test_download,
# test_boundaries).
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
