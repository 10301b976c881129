"""End to end: the installed `infdit` command on real image files with a tiny random model file."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import default_signals, run_cli
from PIL import Image

FAST = ["--steps", "2", "--device", "cpu"]


@pytest.fixture
def w(tiny_weights):
    return ["--weights", str(tiny_weights)]


def rgb_image(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def one_error_line(res):
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def test_rgb_jpeg_long_side(tmp_path, w):
    """Also the entry point's smoke test: the installed `infdit` executable, in its own process."""
    src = tmp_path / "photo.jpg"
    Image.fromarray(rgb_image(30, 40)).save(src, quality=95)
    res = run_cli("upscale", src, "--res", "100", *FAST, *w, "--json", process=True)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    out = Path(summary["output"])
    assert out == tmp_path / "photo_infdit.jpg"  # default name beside the input
    with Image.open(out) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (100, 75)
    assert summary["passes"] == [4] and summary["output_size"] == [75, 100] and summary["seed"] == 0
    assert summary["model_calls"] == 3


def test_rgba_png_keeps_alpha(tmp_path, w):
    src = tmp_path / "logo.png"
    arr = np.zeros((24, 32, 4), np.uint8)
    arr[..., 0] = 200
    arr[:, :16, 3] = 255  # left half opaque red, right half fully transparent black
    Image.fromarray(arr, "RGBA").save(src)
    out = tmp_path / "logo_up.png"
    res = run_cli("upscale", src, "-o", out, "--scale", "2", *FAST, *w)
    assert res.returncode == 0, res.stderr
    with Image.open(out) as im:
        assert im.mode == "RGBA" and im.size == (64, 48)
        a = np.asarray(im)[..., 3]
    assert a[:, :28].min() == 255 and a[:, 36:].max() == 0  # alpha resampled, not lost or inverted


def test_grayscale_stays_grayscale(tmp_path, w):
    src = tmp_path / "gray.png"
    Image.fromarray(rgb_image(20, 24)[..., 0], "L").save(src)
    out = tmp_path / "gray_up.png"
    assert run_cli("upscale", src, "-o", out, "--scale", "4", *FAST, *w).returncode == 0
    with Image.open(out) as im:
        assert im.mode == "L" and im.size == (96, 80)


# A 16-bit grey PNG staying 16-bit (mode I;16, values over 255): test_real_files' gray16.png case, through
# the library and through `infdit batch`; the `upscale` command at 16 bits: test_depth.


def test_exif_orientation_applied_and_reset(tmp_path, w):
    src = tmp_path / "rotated.jpg"
    im = Image.fromarray(rgb_image(24, 40))  # stored 40 wide x 24 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW for display: upright it is 24 wide x 40 high
    exif[0x010F] = "infdit-test-camera"
    im.save(src, exif=exif.tobytes())
    out = tmp_path / "rotated_up.jpg"
    assert run_cli("upscale", src, "-o", out, "--scale", "2", *FAST, *w).returncode == 0
    with Image.open(out) as im2:
        assert im2.size == (48, 80)
        ex = im2.getexif()
        assert ex.get(0x0112) == 1 and ex.get(0x010F) == "infdit-test-camera"


def test_icc_profile_carried(tmp_path, w):
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = tmp_path / "icc.png"
    Image.fromarray(rgb_image(16, 16)).save(src, icc_profile=icc)
    out = tmp_path / "icc_up.webp"
    assert run_cli("upscale", src, "-o", out, "--scale", "2", *FAST, *w).returncode == 0
    with Image.open(out) as im:
        assert im.format == "WEBP" and im.info.get("icc_profile") == icc and im.size == (32, 32)


def test_odd_size_nothing_cropped(tmp_path, w):
    src = tmp_path / "odd.png"
    Image.fromarray(rgb_image(203, 97)).save(src)
    out = tmp_path / "odd_up.tif"
    assert run_cli("upscale", src, "-o", out, "--scale", "2", *FAST, *w).returncode == 0
    with Image.open(out) as im:
        assert im.format == "TIFF" and im.size == (194, 406)


def test_same_seed_same_image_whatever_n(tmp_path, w):
    src = tmp_path / "s.png"
    Image.fromarray(rgb_image(12, 20)).save(src)
    outs = []
    for n in ("1", "3"):
        out = tmp_path / f"s_{n}.png"
        assert run_cli("upscale", src, "-o", out, "--scale", "4", "--block-batch", n, *FAST, *w
                       ).returncode == 0
        outs.append(np.asarray(Image.open(out)).astype(int))
    assert np.abs(outs[0] - outs[1]).max() <= 1  # float rounding may flip one 8-bit level
    out = tmp_path / "s_seed.png"
    run_cli("upscale", src, "-o", out, "--scale", "4", "--seed", "7", *FAST, *w, check=True)
    assert np.abs(np.asarray(Image.open(out)).astype(int) - outs[0]).max() > 10


def test_existing_output_never_replaced(tmp_path, w):
    src = tmp_path / "a.png"
    Image.fromarray(rgb_image(16, 16)).save(src)
    out = tmp_path / "a_up.png"
    out.write_bytes(b"precious")
    res = run_cli("upscale", src, "-o", out, "--scale", "2", *FAST, *w)
    assert res.returncode == 1 and "--overwrite" in one_error_line(res)
    assert out.read_bytes() == b"precious"
    assert run_cli("upscale", src, "-o", out, "--scale", "2", "--overwrite", *FAST, *w).returncode == 0
    assert Image.open(out).size == (32, 32)


@pytest.mark.parametrize("setup,args,fragment,code", [
    ("missing", ["--scale", "2"], "no such file", 1),
    ("text", ["--scale", "2"], "not an image", 1),
    ("truncated", ["--scale", "2"], "damaged or truncated", 1),
    ("ok", ["--scale", "0.5"], "greater than 1", 2),
    ("ok", ["--res", "8"], "only upscales", 2),
    ("ok", ["--res", "100000"], "exceeds", 2),
    ("ok", [], "give a target", 2),
    ("ok", ["--scale", "2", "--device", "tpu"], "unknown device", 2),
    ("ok", ["--scale", "2", "--mem-budget", "lots"], "not a memory size", 2),
    ("ok", ["--scale", "2", "--mem-budget", "1KB"], "needs at least", 2),  # impossible request: 2
    ("ok", ["--scale", "2", "-o", "/nonexistent-dir/x.png"], "output directory does not exist", 1),
    ("ok", ["--scale", "2", "-o", "out.bmp"], "unsupported output type", 2),
    ("big", ["--scale", "2", "--max-pixels", "1000"], "raise --max-pixels", 1),
])
def test_bad_input_one_line(tmp_path, w, setup, args, fragment, code):
    src = tmp_path / "in.png"
    if setup == "text":
        src.write_text("not an image")
    elif setup == "truncated":
        Image.fromarray(rgb_image(64, 64)).save(src)
        src.write_bytes(src.read_bytes()[:300])
    elif setup in ("ok", "big"):
        Image.fromarray(rgb_image(40 if setup == "big" else 16, 40 if setup == "big" else 16)).save(src)
    args = [a if a != "out.bmp" else str(tmp_path / "out.bmp") for a in args]
    res = run_cli("upscale", src, *FAST, *w, *args)
    assert res.returncode == code, res.stderr
    assert fragment in one_error_line(res)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["in.png"] if setup != "missing" else [])


def test_dry_run_plans_without_computing(tmp_path, w):
    src = tmp_path / "p.png"
    Image.fromarray(rgb_image(128, 128)).save(src)
    res = run_cli("upscale", src, "--res", "1024", "--dry-run", *w, "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "128x128 -> 1024x1024: 2 model pass(es), 78 model calls" in res.stdout
    assert "pass 1: 4x 128x128 -> 512x512" in res.stdout and "pass 2: 2x 512x512 -> 1024x1024" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


@pytest.mark.slow
def test_sigint_leaves_no_partial_file(tmp_path, tiny_weights):
    src = tmp_path / "big.png"
    Image.fromarray(rgb_image(160, 160)).save(src)
    out = tmp_path / "big_up.png"
    exe = Path(sys.executable).with_name("infdit")
    proc = subprocess.Popen([str(exe), "upscale", str(src), "-o", str(out), "--scale", "4", "--steps", "200",
                             "--device", "cpu", "--weights", str(tiny_weights),
                             # (whether it would checkpoint depends on the machine's speed)
                             "--no-checkpoint"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signals)
    time.sleep(4)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png"]


def test_batch_resumes_and_survives_a_bad_file(tmp_path, w):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rgb_image(16, 20, 1)).save(root / "a.png")
    Image.fromarray(rgb_image(12, 16, 2)).save(root / "B.JPG")
    Image.fromarray(rgb_image(16, 16, 3)).save(root / "sub" / "c.webp")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "desktop.ini").write_text("[.ShellClassInfo]")
    out = tmp_path / "out"
    res = run_cli("batch", root, "-o", out, "--recursive", "--scale", "2", *FAST, *w, "--json")
    assert res.returncode == 1, res.stderr
    summary = json.loads(res.stdout)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (3, 0, 1)
    failed = [i for i in summary["items"] if i["status"] == "failed"]
    assert failed[0]["input"].endswith("broken.png") and "damaged or truncated" in failed[0]["reason"]
    assert Image.open(out / "a.png").size == (40, 32)
    assert Image.open(out / "B.JPG").size == (32, 24)
    assert Image.open(out / "sub" / "c.webp").size == (32, 32)
    assert not (out / "desktop.ini").exists()

    (out / "a.png").unlink()  # as if interrupted before a.png was written
    mtime = (out / "B.JPG").stat().st_mtime_ns
    res = run_cli("batch", root, "-o", out, "--recursive", "--scale", "2", *FAST, *w, "--json")
    summary = json.loads(res.stdout)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (1, 2, 1)
    assert (out / "B.JPG").stat().st_mtime_ns == mtime and (out / "a.png").exists()


def test_batch_all_good_exits_zero(tmp_path, w):
    root = tmp_path / "in"
    root.mkdir()
    Image.fromarray(rgb_image(8, 8)).save(root / "x.png")
    res = run_cli("batch", root, "--scale", "2", *FAST, *w)
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "in_infdit" / "x.png").size == (16, 16)


def test_help_reads_well():
    for cmd in ([], ["upscale"], ["batch"], ["convert"], ["download"], ["info"]):
        res = run_cli(*cmd, "--help")
        assert res.returncode == 0 and "Usage" in res.stdout


def test_a_dry_run_without_disk_files_has_no_disk_line(tmp_path, w, monkeypatch, capsys):
    """`--dry-run --device cuda` of a job with no scratch and no checkpoints prints no `disk: 0 B` line; a job
    with checkpoints says what they take."""
    src = tmp_path / "a.png"
    Image.fromarray(rgb_image(20, 24)).save(src)
    monkeypatch.setenv("INFDIT_CACHE", str(tmp_path / "cache"))
    args = ("upscale", src, "--scale", "2", "--dry-run", "--device", "cuda", "--mem-budget", "8GB", *w)
    res = _dry(monkeypatch, capsys, args)
    assert "time: predicted" in res and "disk:" not in res, res
    res = _dry(monkeypatch, capsys, (*args, "--checkpoint"))
    assert "  disk: " in res and "checkpoints " in res and "disk: 0 B" not in res, res


def _dry(monkeypatch, capsys, args) -> str:
    """stdout of an in-process `infdit ARGS`."""
    from infdit_cli.cli.app import main

    monkeypatch.setattr(sys, "argv", ["infdit", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    return capsys.readouterr().out


def test_the_eta_is_the_plans_until_measured_progress_replaces_it():
    """The job's ETA: before its first step the plan's prediction less the time spent (marked ~), not
    -:--:--; once a step is done the measured pace, even where steps are slower than rich's 30 s window
    of speed samples (-:--:-- at 40 % before)."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from infdit_cli.cli._progress import RichDisplay
    from infdit_cli.events import JobStarted, PassStarted, StepDone

    now = [1000.0]
    display = RichDisplay(Console(file=io.StringIO(), force_terminal=True, width=120))
    for progress in (display.overall, display.steps):
        progress.get_time = lambda: now[0]
    display(JobStarted([1.0], 39, [100.0], "cpu"))
    p = SimpleNamespace(scale=4, in_size=(20, 24), out_size=(80, 96), seconds=100.0)
    display(PassStarted(1, 1, p, None))

    def eta(progress, task_id) -> str:
        task = next(t for t in progress.tasks if t.id == task_id)
        return progress.columns[-1].render(task).plain

    assert eta(display.overall, display.job_task) == "~0:01:40"  # the plan's 100 s
    assert eta(display.steps, display.step_task) == "~0:01:40"
    now[0] += 10
    assert eta(display.overall, display.job_task) == "~0:01:30"  # 10 s spent, nothing measured yet
    now[0] += 30  # 40 s in: 16 of 39 calls, 41 %: 40 s * 59 / 41 left
    display(StepDone(8, 20, 16, 0.5))
    assert eta(display.overall, display.job_task) == "0:00:58"
    assert eta(display.steps, display.step_task) == "0:00:58"
    # without a plan's prediction nothing is invented
    display(JobStarted([1.0], 39, [], "cpu"))
    assert eta(display.overall, display.job_task) == "-:--:--"
