"""Pipeline truth: with a denoiser that answers its LR condition, D(x; sigma) = lr_up (tests/truth_model.py),
the sampler ends exactly on lr_up and `upscale` is a bicubic upscaler, so every path from file to file is
checked against a bicubic of the input computed here, with Pillow, independently of infdit's code.

The product's definition of that bicubic (pipeline.pass_inputs, upscaler), restated as the reference does it:
each model pass replicate-pads its input at the bottom and right to a multiple of block_size / scale, takes
the bicubic upsample by `scale` (Pillow's BICUBIC kernel, a = -0.5, = torch's antialiased bicubic), clips it
to the valid range and crops the padding's share away; a target that is not the passes' size is reached by
one antialiased bicubic resample of the last pass's result, clipped. The alpha plane skips the passes: one
bicubic resample of the input's alpha to the target.

Each test compares the output file with that reference by PSNR (> THRESHOLD, where the paths are exact but
for 8/16-bit rounding); the controls show the same comparison fails for the reference shifted by one pixel,
flipped, or with its channels swapped.
"""

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import truth_model
from conftest import run_cli
from PIL import Image, ImageOps

from infdit_cli.model.config import PRESETS

# dB. Measured (2-core CPU, float32): every path >= 88 dB, most identical to the bit (inf); an output made
# without the padding rule 51.6 dB, with zero padding 31.3, torch's non-antialiased bicubic (a = -0.75) 34.3;
# the controls: one-pixel shift 20.3, flip 9.6, channel swap 11.0.
THRESHOLD = 60.0
BLOCK = PRESETS["tiny"].block_size  # 16 px: inputs are padded to 4 px (4x) or 8 px (2x)
FAST = ["--steps", "2", "--device", "cpu"]


# --- the independent reference ------------------------------------------------------------------------


def bicubic(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, c) float -> (H, W, c) float32: Pillow's BICUBIC on each float plane (antialiased when it
    shrinks)."""
    planes = [Image.fromarray(np.ascontiguousarray(a[..., c], np.float32), "F").resize((size[1], size[0]),
                                                                                        Image.BICUBIC)
              for c in range(a.shape[-1])]
    return np.stack([np.asarray(p) for p in planes], -1)


def model_pass(a: np.ndarray, scale: int) -> np.ndarray:
    """One pass of the truth denoiser: replicate-pad bottom/right to a multiple of BLOCK // scale, bicubic
    x scale, clip to [0, 1], crop to the input's size x scale."""
    h, w = a.shape[:2]
    unit = BLOCK // scale
    padded = np.pad(a, ((0, -h % unit), (0, -w % unit), (0, 0)), mode="edge")
    up = np.clip(bicubic(padded, (padded.shape[0] * scale, padded.shape[1] * scale)), 0, 1)
    return up[: h * scale, : w * scale]


def expected(a: np.ndarray, passes: list[int], target: tuple[int, int] | None = None) -> np.ndarray:
    """The file the truth denoiser makes from `a` (h, w, c) in [0, 1], before quantisation."""
    for s in passes:
        a = model_pass(a, s)
    if target is not None and a.shape[:2] != tuple(target):
        a = np.clip(bicubic(a, target), 0, 1)
    return a


def quantise(a: np.ndarray, bits: int = 8) -> np.ndarray:
    return np.round(a * (2**bits - 1))


def psnr(out: np.ndarray, ref: np.ndarray, bits: int = 8) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    mse = float(np.mean((out.astype(np.float64) - ref.astype(np.float64)) ** 2))
    db = float("inf") if mse == 0 else 10 * np.log10((2**bits - 1) ** 2 / mse)
    print(f"PSNR {db:.2f} dB")  # shown with `pytest -rP`
    return db


def pixels(path: Path) -> np.ndarray:
    """An 8-bit file's samples as (h, w, c) float64, shown upright (its Orientation tag applied)."""
    with Image.open(path) as im:
        a = np.asarray(ImageOps.exif_transpose(im)).astype(np.float64)
    return a if a.ndim == 3 else a[..., None]


def noise(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, c)) * 255).astype(np.uint8)


def write(path: Path, a: np.ndarray, **kw) -> Path:
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(path, **kw)
    return path


# --- the truth denoiser in this process and in the processes the tests start ------------------------------


@pytest.fixture(scope="module", autouse=True)
def truth_env():
    """In this process (an in-process `run_cli`, the library, serve) and, through the environment, in every
    `infdit` or torchrun process started with it."""
    truth_model.install()
    yield truth_model.env()
    truth_model.uninstall()


@pytest.fixture(scope="module")
def weights(tiny_weights) -> list[str]:
    return ["--weights", str(tiny_weights)]


def upscale(src: Path, out: Path, *args, weights, env) -> dict:
    res = run_cli("upscale", src, "-o", out, *args, *FAST, *weights, "--json", env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


# --- the denoiser and the sampler themselves ----------------------------------------------------------------


@pytest.mark.parametrize("n", [None, 1, 2])
def test_the_truth_denoiser_returns_lr_up_in_every_block_mode(tiny_model, n):
    from infdit_cli.engine.blocks import denoise

    g = torch.Generator().manual_seed(0)
    lr_up = torch.rand(1, 3, 40, 56, generator=g) * 2 - 1  # ragged: 2.5 x 3.5 blocks
    lr = torch.rand(1, 3, 12, 16, generator=g) * 2 - 1
    for sigma in (40.0, 1.0, 0.002):
        x = lr_up + torch.randn(lr_up.shape, generator=g) * sigma
        d = denoise(tiny_model, x, sigma, lr_up=lr_up, lr=lr, block_batch=n)
        assert (d - lr_up).abs().max() <= 1e-5 * max(1.0, sigma)  # float32 rounding of c_skip x + c_out F


def test_the_heun_sampler_ends_on_what_the_denoiser_answers():
    from infdit_cli.engine.sampling import edm_sigmas, sample_heun

    g = torch.Generator().manual_seed(1)
    target = torch.rand(1, 3, 24, 40, generator=g) * 2 - 1
    for steps in (1, 2, 20):
        sigmas = edm_sigmas(steps)
        x0 = target + torch.randn(target.shape, generator=g) * sigmas[0]
        out = sample_heun(lambda x, s: target, x0, sigmas)
        # the last step, x + (0 - sigma) (x - D) / sigma = D, rounds x's last bits: from sigma_min = 0.002
        # (every run of 2 steps or more) x is within 0.01 of D; from sigma_max = 40 (1 step) it is not
        tol = 1e-6 if steps > 1 else 2 * torch.finfo(torch.float32).eps * float(x0.abs().max())
        assert (out - target).abs().max() <= tol, steps


# --- file to file -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rgb4x(tmp_path_factory, weights, truth_env):
    """A 37x22 RGB PNG (not whole blocks: padded) upscaled 4x: (output, reference), 8-bit samples."""
    d = tmp_path_factory.mktemp("rgb4x")
    a = noise(22, 37)
    src = write(d / "in.png", a)
    summary = upscale(src, d / "out.png", "--scale", "4", weights=weights, env=truth_env)
    assert summary["passes"] == [4] and summary["output_size"] == [88, 148]
    return pixels(d / "out.png"), quantise(expected(a / 255.0, [4]))


def test_rgb_4x(rgb4x):
    out, ref = rgb4x
    assert psnr(out, ref) > THRESHOLD


def test_rgb_2x(tmp_path, weights, truth_env):
    a = noise(22, 37, seed=1)
    src = write(tmp_path / "in.png", a)
    summary = upscale(src, tmp_path / "out.png", "--scale", "2", weights=weights, env=truth_env)
    assert summary["passes"] == [2]
    assert psnr(pixels(tmp_path / "out.png"), quantise(expected(a / 255.0, [2]))) > THRESHOLD


def test_grey(tmp_path, weights, truth_env):
    a = noise(20, 30, 1, seed=2)
    src = write(tmp_path / "in.png", a)
    upscale(src, tmp_path / "out.png", "--scale", "4", weights=weights, env=truth_env)
    with Image.open(tmp_path / "out.png") as im:
        assert im.mode == "L"
    assert psnr(pixels(tmp_path / "out.png"), quantise(expected(a / 255.0, [4]))) > THRESHOLD


def test_alpha(tmp_path, weights, truth_env):
    """RGBA: the colour through the model, the alpha plane by its own resample. Alpha is never 0 here, so
    no colour is filled in under transparent pixels (`images.fill_transparent`)."""
    a = noise(18, 26, 4, seed=3)
    a[..., 3] = np.maximum(a[..., 3], 1)
    src = write(tmp_path / "in.png", a)
    upscale(src, tmp_path / "out.png", "--scale", "2", weights=weights, env=truth_env)
    out = pixels(tmp_path / "out.png")
    assert out.shape == (36, 52, 4)
    assert psnr(out[..., :3], quantise(expected(a[..., :3] / 255.0, [2]))) > THRESHOLD
    alpha = np.clip(bicubic(a[..., 3:] / 255.0, (36, 52)), 0, 1)
    assert psnr(out[..., 3:], quantise(alpha)) > THRESHOLD


def test_16bit_png(tmp_path, weights, truth_env):
    """16-bit RGB through pypng both ways (Pillow holds no 16-bit colour); compared at 16 bits."""
    import png

    a = (np.random.default_rng(4).random((18, 22, 3)) * 65535).astype(np.uint16)
    src = tmp_path / "in.png"
    with open(src, "wb") as f:
        png.Writer(22, 18, greyscale=False, bitdepth=16).write(f, a.reshape(18, -1))
    upscale(src, tmp_path / "out.png", "--scale", "2", weights=weights, env=truth_env)
    w, h, rows, info = png.Reader(filename=str(tmp_path / "out.png")).asDirect()
    assert info["bitdepth"] == 16 and info["planes"] == 3 and (h, w) == (36, 44)
    out = np.array([np.asarray(r) for r in rows], np.float64).reshape(h, w, 3)
    assert psnr(out, quantise(expected(a / 65535.0, [2]), 16), bits=16) > THRESHOLD


def test_exif_orientation(tmp_path, weights, truth_env):
    """A JPEG stored 40 wide x 24 high, Orientation 6 (shown rotated 90 degrees clockwise): the output is
    the upright image upscaled, and shows upright (PNG, so the output adds no loss)."""
    src = tmp_path / "in.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    write(src, noise(24, 40, seed=5), exif=exif.tobytes(), quality=95)
    with Image.open(src) as im:
        upright = np.asarray(ImageOps.exif_transpose(im)) / 255.0  # (40, 24, 3): what was decoded, upright
    upscale(src, tmp_path / "out.png", "--scale", "2", weights=weights, env=truth_env)
    assert psnr(pixels(tmp_path / "out.png"), quantise(expected(upright, [2]))) > THRESHOLD


def test_two_passes(tmp_path, weights, truth_env):
    """--res 288 on 18x11: 16x, two 4x passes; the second pass's input is the first's float result."""
    a = noise(11, 18, seed=6)
    src = write(tmp_path / "in.png", a)
    summary = upscale(src, tmp_path / "out.png", "--res", "288", weights=weights, env=truth_env)
    assert summary["passes"] == [4, 4] and summary["output_size"] == [176, 288]
    assert psnr(pixels(tmp_path / "out.png"), quantise(expected(a / 255.0, [4, 4]))) > THRESHOLD


def test_res_resamples_to_a_size_that_is_no_multiple(tmp_path, weights, truth_env):
    """--res 100 on 37x22: one 4x pass (148x88), then an antialiased bicubic down to 100x59."""
    a = noise(22, 37, seed=7)
    src = write(tmp_path / "in.png", a)
    summary = upscale(src, tmp_path / "out.png", "--res", "100", weights=weights, env=truth_env)
    assert summary["passes"] == [4] and summary["output_size"] == [59, 100]
    assert psnr(pixels(tmp_path / "out.png"), quantise(expected(a / 255.0, [4], (59, 100)))) > THRESHOLD


@pytest.mark.parametrize("args", [["--block-batch", "1"], ["--block-batch", "2", "--low-memory"]],
                         ids=["n1", "n2-low-memory"])
def test_block_modes(tmp_path, weights, truth_env, args):
    """n x n blocks with the K/V cache (a 6x10-block grid), the state in RAM or memory-mapped."""
    a = noise(22, 37, seed=8)
    src = write(tmp_path / "in.png", a)
    summary = upscale(src, tmp_path / "out.png", "--scale", "4", *args, weights=weights, env=truth_env)
    assert summary["block_batch"] == [int(args[1])]
    assert psnr(pixels(tmp_path / "out.png"), quantise(expected(a / 255.0, [4]))) > THRESHOLD


@pytest.mark.parametrize("at", [(1, 1), (2, 1)], ids=["pass1-step1", "pass2-step1"])
def test_resume(tmp_path, tiny_model, at):
    """A 4x + 2x job stopped after one step (of pass 1, of pass 2), resumed from its run folder; in pass 2
    from the saved input of that pass (the library in this process, the run folder the command uses). With
    D = lr_up the saved x itself cannot show here (any x ends on lr_up): test_resume.py holds it to the
    bit."""
    from infdit_cli.events import CheckpointWritten, Resumed
    from infdit_cli.jobs.pipeline import UpscaleOptions
    from infdit_cli.jobs.upscaler import Upscaler
    from infdit_cli.plan.planner import nominal_rates

    class Stop(Exception):
        pass

    def stop(e):
        if isinstance(e, CheckpointWritten) and (e.pass_, e.step) == at:
            raise Stop

    a = noise(10, 13, seed=9)
    src, out = write(tmp_path / "in.png", a), tmp_path / "out.png"
    up = Upscaler(tiny_model, options=UpscaleOptions(steps=3), rates=nominal_rates("cpu", torch.float32))
    with pytest.raises(Stop):
        up.upscale_file(src, out, scale=8, checkpoint=True, on_event=stop)
    assert not out.exists()
    seen: list = []
    up.upscale_file(src, out, scale=8, checkpoint=True, on_event=seen.append)
    assert [(e.pass_, e.step) for e in seen if isinstance(e, Resumed)] == [at]
    assert psnr(pixels(out), quantise(expected(a / 255.0, [4, 2]))) > THRESHOLD


@pytest.mark.slow
def test_ranks(tmp_path, tiny_weights, truth_env):
    """torchrun, 2 gloo ranks sharing the image's block columns (n = 2, a 6x25-block grid)."""
    a = noise(24, 100, seed=10)
    src = write(tmp_path / "in.png", a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "infdit_cli", "upscale", str(src), "-o", str(tmp_path / "out.png"), "--scale", "4",
           "--block-batch", "2", *FAST, "--weights", str(tiny_weights)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False,
                         env={**truth_env, "OMP_NUM_THREADS": "1"},
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert psnr(pixels(tmp_path / "out.png"), quantise(expected(a / 255.0, [4]))) > THRESHOLD


def test_batch(tmp_path, weights, truth_env):
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    a, b = noise(14, 21, seed=11), noise(17, 12, 1, seed=12)
    write(root / "a.png", a), write(root / "b.png", b)
    res = run_cli("batch", root, "-o", out, "--scale", "2", *FAST, *weights, env=truth_env)
    assert res.returncode == 0, res.stderr
    assert psnr(pixels(out / "a.png"), quantise(expected(a / 255.0, [2]))) > THRESHOLD
    assert psnr(pixels(out / "b.png"), quantise(expected(b / 255.0, [2]))) > THRESHOLD


def test_serve(tmp_path, tiny_model):
    """A job through the web API: the app and its job runner in this process, on 127.0.0.1."""
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from infdit_cli.jobs.pipeline import UpscaleOptions
    from infdit_cli.jobs.upscaler import Upscaler
    from infdit_cli.plan.planner import nominal_rates
    from infdit_cli.serve.app import create_app
    from infdit_cli.serve.jobs import JobRunner, JobStore

    a = noise(20, 28, seed=13)
    src = write(tmp_path / "in.png", a)
    store = JobStore(tmp_path / "jobs")
    up = Upscaler(tiny_model, options=UpscaleOptions(steps=2), rates=nominal_rates("cpu", torch.float32))
    runner = JobRunner(store, up, max_pixels=1 << 24)
    app = create_app(runner)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    web = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    web.start()
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert web.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        boundary = uuid.uuid4().hex
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="scale"\r\n\r\n4\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="steps"\r\n\r\n2\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="in.png"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + src.read_bytes() \
            + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(url + "api/jobs", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            job = json.loads(r.read())
        deadline = time.monotonic() + 120
        while job["state"] not in ("done", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
            with urllib.request.urlopen(url + f"api/jobs/{job['id']}", timeout=60) as r:
                job = json.loads(r.read())
        assert job["state"] == "done", job
        with urllib.request.urlopen(url + job["result_url"].lstrip("/"), timeout=60) as r:
            (tmp_path / "out.png").write_bytes(r.read())
    finally:
        runner.stop()
        app.closing()
        server.should_exit = True
        web.join(30)
        store.close()
    assert psnr(pixels(tmp_path / "out.png"), quantise(expected(a / 255.0, [4]))) > THRESHOLD


# --- controls: the comparison can fail ----------------------------------------------------------------------


def test_control_one_pixel_shift_fails(rgb4x):
    out, ref = rgb4x
    shifted = np.concatenate([ref[:, :1], ref[:, :-1]], axis=1)  # one pixel right, the edge column repeated
    assert psnr(out, shifted) < THRESHOLD


def test_control_flip_fails(rgb4x):
    out, ref = rgb4x
    assert psnr(out, ref[:, ::-1]) < THRESHOLD


def test_control_channel_swap_fails(rgb4x):
    out, ref = rgb4x
    assert psnr(out, ref[..., ::-1]) < THRESHOLD
