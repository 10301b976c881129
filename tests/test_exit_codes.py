"""The README's exit-code contract, one test per code, through the real error funnel (`cli.app.main`)
run in-process, plus the 'real mistake first' and 'one literal line' rules."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from infdit_cli import errors
from infdit_cli.cli.app import main
from infdit_cli.jobs.upscaler import Upscaler

FAST = ["--steps", "2", "--device", "cpu"]


def infdit(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run `infdit ARGS` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["infdit", *map(str, args)])
    monkeypatch.delenv("INFDIT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    return e.value.code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def photo(tmp_path):
    src = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((8, 12, 3)) * 255).astype(np.uint8)).save(src)
    return src


def test_0_done(monkeypatch, capsys, photo, tiny_weights):
    code, _, err = infdit(monkeypatch, capsys, "upscale", photo, "--scale", "2", *FAST, "--weights",
                          tiny_weights)
    assert code == 0, err
    assert Image.open(photo.with_name("photo_infdit.png")).size == (24, 16)


@pytest.mark.parametrize("setup,fragment", [
    ("missing", "no such file"),
    ("garbage", "not an image"),
    ("no-dir", "output directory does not exist"),
    ("exists", "--overwrite"),
])
def test_1_file_cannot_be_read_or_written(monkeypatch, capsys, photo, setup, fragment):
    # no weights anywhere: the file problem must be what is reported, not the weights
    args = ["upscale", photo, "--scale", "2", *FAST, "--weights", photo.with_name("none.safetensors")]
    if setup == "missing":
        args[1] = photo.with_name("gone.png")
    elif setup == "garbage":
        photo.write_bytes(b"hello")
    elif setup == "no-dir":
        args += ["-o", photo.parent / "nope" / "x.png"]
    elif setup == "exists":
        photo.with_name("photo_infdit.png").write_bytes(b"mine")
    before = {p.name: p.read_bytes() for p in photo.parent.iterdir()}
    code, _, err = infdit(monkeypatch, capsys, *args)
    assert code == 1 and fragment in one_line(err)
    assert {p.name: p.read_bytes() for p in photo.parent.iterdir()} == before  # nothing lost or added


@pytest.mark.parametrize("args,fragment", [
    (["--res", "4k"], "--res must be a long side"),
    (["--res", "100", "--scale", "2"], "not both"),
    ([], "give a target"),
    (["--scale", "0.5"], "greater than 1"),
    (["--res", "4"], "only upscales"),
    (["--scale", "2", "-o", "out.bmp"], "unsupported output type"),
    (["--scale", "2", "--mem-budget", "lots"], "not a memory size"),
    (["--scale", "2", "--frobnicate"], "No such option"),
    (["--scale", "2", "--compile"], "--compile is for CUDA devices"),
    (["--scale", "2", "--no-compile", "--res", "9"], "not both"),  # --no-compile is fine on the CPU
])
def test_2_wrong_command_line_before_weights(monkeypatch, capsys, photo, args, fragment):
    code, _, err = infdit(monkeypatch, capsys, "upscale", photo, *FAST, "--weights",
                          "/nonexistent.safetensors",
                          *[a if a != "out.bmp" else photo.with_name("out.bmp") for a in args])
    line = one_line(err)
    assert code == 2 and fragment in line, line
    assert "weights" not in line.replace("--weights", "")


def test_2_missing_input_with_bad_res_names_the_option(monkeypatch, capsys, tmp_path):
    code, _, err = infdit(monkeypatch, capsys, "upscale", tmp_path / "gone.png", "--res", "4k")
    assert code == 2 and "--res" in one_line(err)


def test_2_budget_nothing_fits_in(monkeypatch, capsys, photo, tiny_weights):
    code, _, err = infdit(monkeypatch, capsys, "upscale", photo, "--scale", "2", *FAST, "--weights",
                          tiny_weights, "--mem-budget", "1KB")
    assert code == 2 and "needs at least" in one_line(err)
    assert sorted(p.name for p in photo.parent.iterdir()) == ["photo.png"]


@pytest.mark.parametrize("exc",
                         [errors.OutOfMemory("out of device memory even at n=1 with the cache on the host"),
                                 torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")])
def test_3_out_of_memory(monkeypatch, capsys, photo, tiny_weights, exc):
    def oom(*a, **k):
        raise exc

    monkeypatch.setattr(Upscaler, "upscale_file", oom)
    code, _, err = infdit(monkeypatch, capsys, "upscale", photo, "--scale", "2", *FAST, "--weights",
                          tiny_weights)
    assert code == 3 and "out of device memory" in one_line(err)


def test_130_interrupted(monkeypatch, capsys, photo, tiny_weights):
    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Upscaler, "upscale_file", ctrl_c)
    code, _, err = infdit(monkeypatch, capsys, "upscale", photo, "--scale", "2", *FAST, "--weights",
                          tiny_weights)
    assert code == 130 and "interrupted" in one_line(err)


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_143_129_terminated(monkeypatch, capsys, photo, tiny_weights, sig, code):
    import signal

    def term(*a, **k):
        raise errors.Signalled(getattr(signal, sig))

    monkeypatch.setattr(Upscaler, "upscale_file", term)
    rc, _, err = infdit(monkeypatch, capsys, "upscale", photo, "--scale", "2", *FAST, "--weights",
                        tiny_weights)
    assert rc == code and one_line(err) == f"error: terminated by {sig}"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() restored the handlers it set


def test_batch_1_after_finishing_the_others(monkeypatch, capsys, tmp_path, tiny_weights):
    root = tmp_path / "in"
    root.mkdir()
    for name in ("a.png", "c.png"):
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(root / name)
    (root / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, _, err = infdit(monkeypatch, capsys, "batch", root, "--scale", "2", *FAST, "--weights",
                          tiny_weights)
    assert code == 1, err
    assert sorted(p.name for p in (tmp_path / "in_infdit").iterdir()) == ["a.png", "c.png"]
    assert "b.png" in err and "1 failed" in err


def test_names_printed_literally(monkeypatch, capsys, tmp_path):
    code, _, err = infdit(monkeypatch, capsys, "upscale", tmp_path / "[bold]x.png", "--scale", "2")
    assert code == 1 and "[bold]x.png" in one_line(err)


def test_convert_keeps_torch_advice_to_itself(monkeypatch, capsys, photo, tmp_path):
    code, _, err = infdit(monkeypatch, capsys, "convert", photo, "-o", tmp_path / "m.safetensors")
    line = one_line(err)
    assert code == 1 and "not a PyTorch checkpoint" in line and "weights_only" not in line


def test_batch_empty_folder_says_so(monkeypatch, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = infdit(monkeypatch, capsys, "batch", tmp_path / "empty", "--scale", "2",
                          "--weights", "/nonexistent.safetensors")
    assert code == 0 and "nothing to do" in err and not (tmp_path / "empty_infdit").exists()


# --- before any work: dry runs check what the real run would refuse -----------------------------------------

def test_dry_run_checks_the_output_can_be_written(monkeypatch, capsys, photo):
    photo.with_name("photo_infdit.png").write_bytes(b"mine")
    code, out, err = infdit(monkeypatch, capsys, "upscale", photo, "--scale", "2", "--dry-run")
    assert code == 1 and "--overwrite" in one_line(err) and out == ""
    code, out, err = infdit(monkeypatch, capsys, "upscale", photo, "--scale", "2", "--dry-run",
                            "-o", photo.parent / "nope" / "x.png")
    assert code == 1 and "output directory does not exist" in one_line(err)
    code, out, _ = infdit(monkeypatch, capsys, "upscale", photo, "--scale", "2", "--dry-run", "--overwrite")
    assert code == 0 and "12x8 -> 24x16" in out


def test_batch_dry_run_lists_and_writes_nothing(monkeypatch, capsys, tmp_path):
    import json

    root = tmp_path / "in"
    root.mkdir()
    for name in ("photo.png", "photo.gif"):
        Image.fromarray(np.full((4, 6, 3), 50, np.uint8)).save(root / name)
    (root / "notes.jpg").write_text("text")
    code, out, _ = infdit(monkeypatch, capsys, "batch", root, "--scale", "2", "--dry-run", "--json",
                          "--weights", "/nonexistent.safetensors")
    items = {i["input"].rsplit("/", 1)[-1]: i for i in json.loads(out)["items"]}
    assert code == 1  # what the real run would return
    assert items["photo.gif"]["output"].endswith("photo.gif.png") and \
        items["photo.gif"]["reason"] == "6x4 -> 12x8"
    assert items["notes.jpg"]["status"] == "failed" and "not an image" in items["notes.jpg"]["reason"]
    assert not (tmp_path / "in_infdit").exists()


def test_batch_usage_before_weights(monkeypatch, capsys, tmp_path):
    code, _, err = infdit(monkeypatch, capsys, "batch", tmp_path, "--res", "4k", "--weights",
                          "/none.safetensors")
    assert code == 2 and "--res must be" in one_line(err)
    code, _, err = infdit(monkeypatch, capsys, "batch", tmp_path, "-o", tmp_path, "--scale", "2")
    assert code == 2 and "output folder is the input folder" in one_line(err)


# -- a stop before the sampling starts (issue 30 item 5): real signals, so real processes ------------------

_HOLD = {  # Python run before the CLI's main: holds the run in one phase, touching MARK once it is there
    "import": ("class _Hold:\n"  # the command's own import of torch (main's handlers are in place by then)
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'torch':\n"
               "            hold()\n"
               "sys.meta_path.insert(0, _Hold())\n"),
    "plan": ("import infdit_cli.jobs.pipeline as P\n_real = P.plan_upscale\n"
             "def _held(*a, **k):\n    hold()\n    return _real(*a, **k)\nP.plan_upscale = _held\n"),
    "weights": ("from infdit_cli.jobs.upscaler import Upscaler\n_real = Upscaler.from_weights.__func__\n"
                "def _held(cls, *a, **k):\n    hold()\n    return _real(cls, *a, **k)\n"
                "Upscaler.from_weights = classmethod(_held)\n"),
}


@pytest.mark.slow
@pytest.mark.parametrize("phase,sig,debug", [("import", "SIGTERM", False), ("plan", "SIGTERM", False),
                                             ("plan", "SIGHUP", True), ("weights", "SIGTERM", True),
                                             ("weights", "SIGHUP", False)])
def test_a_stop_before_sampling_is_143_or_129_with_its_line(tmp_path, photo, tiny_weights, phase, sig, debug):
    """SIGTERM / SIGHUP while the command imports torch, while the plan is made, while the weights load:
    exit 143 / 129 and the one line, no traceback even with INFDIT_DEBUG=1, nothing left beside the output
    (the lock taken before the weights load is gone)."""
    import os
    import signal
    import subprocess
    import time

    from conftest import default_signals

    mark = tmp_path / "held"
    out = tmp_path / "out" / "big.png"
    out.parent.mkdir()
    code = (f"import pathlib, sys, time\nMARK = {str(mark)!r}\n"
            "def hold():\n    pathlib.Path(MARK).touch()\n    time.sleep(120)\n"
            f"{_HOLD[phase]}from infdit_cli.cli.app import main\n"
            "sys.argv = ['infdit'] + sys.argv[1:]\nmain()\n")
    env = {**os.environ, "INFDIT_DEBUG": "1"} if debug else {k: v for k, v in os.environ.items()
                                                             if k != "INFDIT_DEBUG"}
    proc = subprocess.Popen([sys.executable, "-c", code, "upscale", str(photo), "-o", str(out), "--scale",
                             "2", *FAST, "--weights", str(tiny_weights), "--checkpoint"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signals)
    deadline = time.monotonic() + 120
    while not mark.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == {"SIGTERM": 143, "SIGHUP": 129}[sig], err
    assert err.strip() == f"error: terminated by {sig}", err  # one line: no traceback, no ValueError
    assert list(out.parent.iterdir()) == []
