"""`infdit download URL`: an official-format checkpoint served from 127.0.0.1 is streamed, resumed,
verified, converted and cached; later runs use the cache with the server gone; failures are one line."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CKPT, RELEASE, run_cli
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from infdit_cli.units import format_bytes

DIGEST = hashlib.sha256(CKPT).hexdigest()


def _one_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def _cache_files(tmp_path) -> list[str]:
    root = tmp_path / "cache"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _gets(fake) -> list:
    return [rng for method, _, rng in fake.log if method == "GET"]


def _image(tmp_path) -> Path:
    src = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8)).save(src)
    return src


@pytest.mark.slow
def test_resumes_verifies_converts_caches_then_works_offline(release, official_file):
    fake, url, env, tmp_path = release
    cut = len(CKPT) // 3
    fake.cut_next_get_at = cut
    res = run_cli("download", url, "--sha256", DIGEST.upper(), "--clip-head-width", "32", "--json", env=env)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert _gets(fake) == [None, f"bytes={cut}-"]  # the cut transfer was resumed, not restarted
    path = Path(got["path"])
    assert path.is_relative_to(tmp_path / "cache")
    assert got["source"] == url and got["source_sha256"] == DIGEST
    assert got["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["infdit_source"] == url and meta["infdit_source_sha256"] == DIGEST
    assert meta["infdit_converter"].startswith("infdit-convert/")
    ours, reference = load_file(str(path)), load_file(str(official_file))  # same tensors as `infdit convert`
    assert ours.keys() == reference.keys() and all(ours[k].equal(reference[k]) for k in ours)
    assert [f for f in _cache_files(tmp_path) if f.endswith((".pt", ".part"))] == []  # pickle deleted

    fake.stop()  # from here on nothing can be fetched
    again = run_cli("download", url, "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {**got, "cached": True}

    src = _image(tmp_path)
    outs = []
    for name, weights in (("a.png", url), ("b.png", official_file)):
        up = run_cli("upscale", src, "-o", tmp_path / name, "--scale", "2", "--steps", "2", "--device", "cpu",
                     "--weights", weights, env=env)
        assert up.returncode == 0, up.stderr
        outs.append(np.asarray(Image.open(tmp_path / name)))
    assert outs[0].shape == (64, 96, 3) and np.array_equal(outs[0], outs[1])


def _default_model_env(tmp_path, url, env) -> dict:
    """The default model's release URL pointed at the local server (a manifest in INFDIT_REGISTRY
    overrides the packaged one)."""
    reg = tmp_path / "registry"
    reg.mkdir()
    (reg / "infdit-4x.json").write_text(json.dumps({
        "name": "infdit-4x", "repo_id": None, "filename": "infdit-4x.safetensors", "revision": None,
        "sha256": None, "size": None, "license": "test", "source": "test", "conversion": "test",
        "release_url": url, "release_sha256": DIGEST, "release_size": len(CKPT), "clip_head_width": 32}))
    return {**env, "INFDIT_REGISTRY": str(reg)}


UPSCALE = ("--scale", "2", "--steps", "2", "--device", "cpu")


@pytest.mark.slow
def test_default_model_is_one_command(release):
    """On a fresh cache `infdit upscale` with no --weights downloads, verifies, converts and upscales in one
    command (one line first); the second run makes no request; --dry-run never downloads."""
    fake, url, env, tmp_path = release
    env = _default_model_env(tmp_path, url, env)
    src = _image(tmp_path)
    dry = run_cli("upscale", src, *UPSCALE, "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    # --dry-run never downloads (the plan's time calibration, kept unless taken under load, is the cache's
    # only file)
    assert fake.log == [] and set(_cache_files(tmp_path)) <= {"calibration.json"}
    res = run_cli("upscale", src, "-o", tmp_path / "out.png", *UPSCALE, env=env)
    assert res.returncode == 0, res.stderr
    assert _gets(fake) == [None]
    plan, first = res.stderr.strip().splitlines()[:2]  # the plan's first line, then the download's
    assert plan.startswith("predicted ") and "on cpu (1 pass(es), 3 model calls)" in plan, res.stderr
    assert res.stderr.count("predicted ") == 1  # not again when the job starts
    assert first == (f"downloading infdit-4x ({format_bytes(len(CKPT))}) once into {tmp_path / 'cache'}; "
                     "later runs use it offline"), res.stderr
    assert Image.open(tmp_path / "out.png").size == (96, 64)
    assert [f for f in _cache_files(tmp_path) if f.endswith((".pt", ".part"))] == []
    n = len(fake.log)
    again = run_cli("upscale", src, "-o", tmp_path / "again.png", *UPSCALE, env=env)
    assert again.returncode == 0, again.stderr
    assert len(fake.log) == n and "downloading" not in again.stderr  # from the cache, no request
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")),
                          np.asarray(Image.open(tmp_path / "out.png")))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["--offline", "HF_HUB_OFFLINE", "INFDIT_OFFLINE"])
def test_first_use_offline_keeps_the_one_line_error(release, how):
    fake, url, env, tmp_path = release
    env = _default_model_env(tmp_path, url, env)
    args = ("--offline",) if how == "--offline" else ()
    if how != "--offline":
        env[how] = "1"
    res = run_cli("upscale", _image(tmp_path), *UPSCALE, *args, env=env)
    assert res.returncode == 1 and _one_line(res).endswith("run `infdit download`")
    assert fake.log == []


@pytest.mark.slow
def test_interrupted_first_download_resumes_on_the_next_upscale(release):
    fake, url, env, tmp_path = release
    env = _default_model_env(tmp_path, url, env)
    src = _image(tmp_path)
    fake.cut_every_get_at = 100_000
    res = run_cli("upscale", src, "-o", tmp_path / "out.png", *UPSCALE, env=env)
    assert res.returncode == 1 and "run the command again to resume" in res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr and not (tmp_path / "out.png").exists()
    assert [f for f in _cache_files(tmp_path) if f.endswith(".part")]  # the resumable part is kept
    fake.cut_every_get_at = None
    res = run_cli("upscale", src, "-o", tmp_path / "out.png", *UPSCALE, env=env)
    assert res.returncode == 0, res.stderr
    assert _gets(fake)[-1] == "bytes=400000-"
    assert Image.open(tmp_path / "out.png").size == (96, 64)


def test_partial_file_from_a_killed_run_is_resumed(release):
    from infdit_cli.weights import cache

    fake, url, env, tmp_path = release
    os.environ["INFDIT_CACHE"] = env["INFDIT_CACHE"]
    try:
        d = cache.url_dir(url)
    finally:
        del os.environ["INFDIT_CACHE"]
    d.mkdir(parents=True)
    (d / "checkpoint.pt.part").write_bytes(CKPT[:1000])
    (d / "model.safetensors").write_bytes(b"half-written by a crash")  # no record: never taken as whole
    res = run_cli("download", url, "--sha256", DIGEST, "--clip-head-width", "32", "--quiet", env=env)
    assert res.returncode == 0, res.stderr
    assert _gets(fake) == ["bytes=1000-"]
    assert res.stdout.strip() == str(d / "model.safetensors")
    assert (d / "model.safetensors").read_bytes()[:8] != b"half-wri"


@pytest.mark.slow
def test_two_processes_download_once(release):
    fake, url, env, tmp_path = release
    fake.throttle_s = 0.05  # ~1 s per transfer, so the two runs overlap
    args = [str(Path(sys.executable).with_name("infdit")), "download", url, "--clip-head-width", "32",
            "--json"]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    a, b = (json.loads(o) for o, _ in outs)
    assert a["path"] == b["path"] and a["sha256"] == b["sha256"] and \
        {a["cached"], b["cached"]} == {True, False}
    assert len(_gets(fake)) == 1  # the second waited on the lock and found the file cached


def test_wrong_hash_leaves_nothing(release):
    fake, url, env, tmp_path = release
    res = run_cli("download", url, "--sha256", "0" * 64, "--clip-head-width", "32", env=env)
    assert res.returncode == 1
    line = _one_line(res)
    assert "sha256" in line and DIGEST in line and "nothing was cached" in line
    assert [f for f in _cache_files(tmp_path) if not f.endswith(".lock")] == []


def test_link_that_keeps_breaking_says_run_again(release):
    fake, url, env, tmp_path = release
    fake.cut_every_get_at = 100_000
    res = run_cli("download", url, "--clip-head-width", "32", env=env)
    assert res.returncode == 1
    assert "run the command again to resume" in _one_line(res)
    assert len(_gets(fake)) == 4
    fake.cut_every_get_at = None  # the next run picks up the 400 000 bytes already there
    res = run_cli("download", url, "--clip-head-width", "32", "--quiet", env=env)
    assert res.returncode == 0, res.stderr
    assert _gets(fake)[-1] == "bytes=400000-"


def test_404(release):
    fake, url, env, _ = release
    res = run_cli("download", url.replace("6e313f7e", "00000000"), env=env)
    assert res.returncode == 1 and "not found (404)" in _one_line(res)


def test_unreachable_host_is_one_line_quickly(release):
    _, _, env, tmp_path = release
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    res = run_cli("download", f"http://127.0.0.1:{port}/f/x/?dl=1", env=env)
    assert res.returncode == 1 and f"cannot reach 127.0.0.1:{port}" in _one_line(res)
    t0h = time.monotonic()
    hub = run_cli("download", "acme/model/model.safetensors",
                  env={**env, "HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert hub.returncode == 1 and "could not reach the Hub" in _one_line(hub)
    # Each run includes starting the CLI (~3 s, more on a busy machine). huggingface_hub's own retries
    # took 23 s of backoff plus eleven warning lines here; the one-line error comes without them.
    assert time.monotonic() - t0h < 15 and t0h - t0 < 15


@pytest.mark.parametrize("args", [
    ["download", "acme/../etc/passwd"],
    ["download", "acme/model/../../secret"],
    ["download", "acme/model@../main"],
    ["download", "ac me/model"],
    ["download", "acme/model/file?.safetensors"],
    ["download", "no-such-model"],
    ["download", "http://"],
    ["download", "URL", "--sha256", "abc"],
    ["info", "acme/..", "--json"],
    ["upscale", "IMG", "--weights", "acme/x--y/model.safetensors"],
])
def test_invalid_reference_refused_before_any_request(release, args):
    fake, url, env, tmp_path = release
    args = [url if a == "URL" else str(_image(tmp_path)) if a == "IMG" else a for a in args]
    res = run_cli(*args, env=env)
    assert res.returncode == 2, res.stderr
    _one_line(res)
    assert fake.log == []


@pytest.mark.parametrize("body,ctype,fragment", [
    (b"<html><body>Sign in to continue</body></html>", "text/html; charset=utf-8", "web page"),
    (b"hello, not a checkpoint\n" * 100, None, "not an official Inf-DiT checkpoint"),
])
def test_non_checkpoint_is_refused_and_not_cached(release, body, ctype, fragment):
    fake, url, env, tmp_path = release
    fake.plain[RELEASE] = body
    if ctype:
        fake.content_types[RELEASE] = ctype
    res = run_cli("download", url, env=env)
    assert res.returncode == 1
    assert fragment in _one_line(res)
    assert [f for f in _cache_files(tmp_path) if not f.endswith(".lock")] == []


def test_disk_full_is_one_clear_error(release, monkeypatch):
    """Writes to /dev/full fail with ENOSPC, as on a full disk; the partial file is kept for a resume."""
    from infdit_cli.errors import DownloadError
    from infdit_cli.weights import download

    fake, url, _, tmp_path = release
    dest = tmp_path / "checkpoint.pt"
    dest.with_name("checkpoint.pt.part").symlink_to("/dev/full")
    monkeypatch.setattr(download, "_hash_existing", lambda part: (hashlib.sha256(), 0))
    with pytest.raises(DownloadError, match=r"no space left on device .* run the command again to resume"):
        download.fetch_url(url, dest)
    assert not dest.exists()


def test_verified_once_then_trusted_until_the_file_changes(tmp_path, monkeypatch):
    from infdit_cli.weights import cache

    monkeypatch.setenv("INFDIT_CACHE", str(tmp_path / "cache"))
    calls = []
    real = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    assert cache.verified_sha256(f) == digest and cache.verified_sha256(f) == digest
    assert len(calls) == 1
    f.write_bytes(b"abd")  # a changed file (size equal, mtime not) is hashed again
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert cache.verified_sha256(f) == hashlib.sha256(b"abd").hexdigest()
    assert len(calls) == 2
    assert cache.same_digest(digest.upper(), digest) and not cache.same_digest(digest, None)


def run_main(monkeypatch, capsys, *args) -> tuple[int, list[str]]:
    """`infdit ARGS` in this process: (exit code, stderr lines)."""
    from infdit_cli.cli.app import main

    monkeypatch.setattr(sys, "argv", ["infdit", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
    return done.value.code, capsys.readouterr().err.strip().splitlines()


def _fresh_cache_without_a_gpu(tmp_path, monkeypatch, cuda) -> int:
    """An empty cache whose default model's release is on a port nothing listens on (returned: the download
    cannot start), and a torch built for `cuda` (None: a CPU-only build) that finds no GPU."""
    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _default_model_env(tmp_path, f"http://127.0.0.1:{port}{RELEASE}?dl=1", {})
    for k in ("INFDIT_WEIGHTS", "INFDIT_REPO", "INFDIT_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in {**env, "INFDIT_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"),
                 "HF_HUB_OFFLINE": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return port


@pytest.mark.parametrize("cuda", [None, "12.8"], ids=["cpu-only-torch", "no-driver-or-device"])
def test_the_plan_and_the_cpu_fallback_come_before_the_download(tmp_path, monkeypatch, capsys, cuda):
    """`infdit upscale` on a fresh cache with --device auto on a machine without a GPU: the plan's first line
    (with a GPU's time: the job is over an hour on this CPU) and why it runs on the CPU come before the
    download's first line; the download (to a port nothing listens on) then fails in one line."""
    import infdit_cli.plan.calibrate as calibrate
    from infdit_cli.plan.planner import Rates

    port = _fresh_cache_without_a_gpu(tmp_path, monkeypatch, cuda)
    monkeypatch.setattr(calibrate, "calibration", lambda *a, **k: Rates(2e9, 3e-6, 4e9, source="measured"))
    src = _image(tmp_path)
    code, lines = run_main(monkeypatch, capsys, "upscale", src, "-o", tmp_path / "out.png", "--scale", "4")
    assert code == 1, lines
    plan, fallback, fetch, error = lines
    assert plan.startswith("predicted ") and " on cpu (1 pass(es), 39 model calls)" in plan, plan
    assert "a CUDA GPU (H100-class, bf16) would take about" in plan  # the job is days on this CPU
    assert fallback.startswith("running on the CPU: this torch")
    if cuda is None:
        assert "CPU-only build" in fallback and "install a CUDA build of torch" in fallback
    else:
        assert "built for CUDA 12.8 but finds no GPU" in fallback and "nvidia-smi" in fallback
    assert fetch.startswith("downloading infdit-4x"), fetch
    assert error.startswith("error:") and f"127.0.0.1:{port}" in error
    assert not (tmp_path / "out.png").exists()


def test_bench_says_what_it_measures_and_the_cpu_fallback_before_the_download(tmp_path, monkeypatch, capsys):
    """`infdit bench` on a fresh cache with --device auto and no GPU: the sizes it will measure and why it
    runs on the CPU come before the download's first line; the download then fails in one line."""

    port = _fresh_cache_without_a_gpu(tmp_path, monkeypatch, None)
    code, lines = run_main(monkeypatch, capsys, "bench")
    assert code == 1, lines
    plan, fallback, fetch, error = lines
    assert plan == "bench: 256x256, 512x512, 1024x1024 on cpu float32 (default sizes stop where one is " \
                   "predicted over 90 s)", plan
    assert fallback.startswith("running on the CPU: this torch") and "CPU-only build" in fallback
    assert fetch.startswith("downloading infdit-4x"), fetch
    assert error.startswith("error:") and f"127.0.0.1:{port}" in error


def test_a_named_cpu_has_no_fallback_line_and_cached_weights_say_the_plan_once(tmp_path, monkeypatch, capsys,
                                                                                 tiny_weights):
    """--device cpu is a choice, not a fallback; with the weights here the plan's line comes once (before the
    first call, not again from the job's start)."""
    monkeypatch.setenv("INFDIT_CACHE", str(tmp_path / "cache"))
    code, lines = run_main(monkeypatch, capsys, "upscale", _image(tmp_path), "-o", tmp_path / "out.png",
                        "--scale", "2", "--steps", "2", "--device", "cpu", "--weights", tiny_weights)
    assert code == 0, lines
    assert [ln.split(" on ")[0].split()[0] for ln in lines] == ["predicted", "wrote"], lines
