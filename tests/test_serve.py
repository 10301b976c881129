"""`infdit serve` against a real server process on 127.0.0.1 with the tiny model: the API, the event stream,
previews, results equal to `infdit upscale`, cancel, bad uploads, the token, the jobs folder's lock, and a
job that survives SIGKILL of its server."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "INFDIT_OFFLINE": "1"}


class Server:
    """`infdit serve --port 0 ...` in its own process; `url` once it listens."""

    def __init__(self, jobs: Path, weights: Path, *args: str, cache: Path,
                 prefix: tuple[str, ...] = ()) -> None:
        self.err_path = jobs.parent / f"serve-{uuid.uuid4().hex[:6]}.err"
        self.err = open(self.err_path, "w")
        cmd = [*prefix, sys.executable, "-m", "infdit_cli", "serve", "--port", "0", "--jobs", str(jobs),
               "--weights", str(weights), "--device", "cpu", *args]
        self.proc = subprocess.Popen(cmd, env={**ENV, "INFDIT_CACHE": str(cache)}, stdout=subprocess.DEVNULL,
                                     stderr=self.err)
        self.url = self.token = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            m = re.search(r"infdit serve: (http://\S+?/)(\?token=(\S+))?\s", self.stderr())
            if m:
                self.url, self.token = m.group(1).replace("0.0.0.0", "127.0.0.1"), m.group(3)
                return
            time.sleep(0.2)
        raise AssertionError(f"the server did not start: {self.stderr()}")

    def stderr(self) -> str:
        return self.err_path.read_text()

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()
        return self.proc.returncode


def request(url: str, *, method: str = "GET", data: bytes | None = None, headers: dict | None = None):
    """(status, headers, body bytes); errors are answers too."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def multipart(fields: dict, file: tuple[str, bytes] | None) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    if file is not None:
        name, data = file
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return (b"".join(parts) + f"--{boundary}--\r\n".encode(),
            {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def post_image(server: Server, path: str, image: Path | bytes, name: str = "photo.png", headers=None,
               **fields):
    data = image.read_bytes() if isinstance(image, Path) else image
    body, h = multipart({k: str(v) for k, v in fields.items()}, (name, data))
    status, _, out = request(server.url + path.lstrip("/"), method="POST", data=body,
                             headers={**h, **(headers or {})})
    return status, json.loads(out) if out else None


def get_json(server: Server, path: str, headers=None):
    status, _, out = request(server.url + path.lstrip("/"), headers=headers)
    return status, json.loads(out)


def wait_for(server: Server, job_id: str, pred, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, job = get_json(server, f"api/jobs/{job_id}")
        if pred(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never got there: {job}")


class Events:
    """The server's event stream, read in a thread: (event name, data) pairs."""

    def __init__(self, server: Server) -> None:
        self.seen: list[tuple[str, dict]] = []
        self.resp = urllib.request.urlopen(server.url + "api/events", timeout=120)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        name = None
        try:
            for raw in self.resp:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    self.seen.append((name, json.loads(line[6:])))
        except Exception:  # noqa: BLE001 - the server went away
            pass


def image(path: Path, h: int, w: int, seed: int = 0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def pixels(data_or_path) -> np.ndarray:
    from io import BytesIO

    src = BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with Image.open(src) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture()
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "serve-cache"  # one calibration for every server here


@pytest.mark.slow
def test_a_job_through_the_api_equals_infdit_upscale_and_jobs_cancel(tmp_path, tiny_weights, cache):
    src = image(tmp_path / "photo.png", 40, 48)
    ref = tmp_path / "ref.png"
    run_cli("upscale", src, "-o", ref, "--scale", "4", "--steps", "3", "--device", "cpu", "--weights",
            tiny_weights, "-q", check=True, env={**ENV, "INFDIT_CACHE": str(cache)})
    server = Server(tmp_path / "jobs", tiny_weights, cache=cache)
    try:
        status, info = get_json(server, "api/info")
        assert status == 200 and info["device"] == "cpu" and info["token_required"] is False
        status, plan = post_image(server, "api/plan", src, scale=4, steps=3)
        assert status == 200, plan
        assert plan["output_size"] == [160, 192] and plan["lines"][0].startswith("48x40 -> 192x160")
        assert plan["predicted_seconds"] > 0
        # a plan keeps nothing
        assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == [".infdit", "lock"]
        events = Events(server)
        status, job = post_image(server, "api/jobs", src, name="my photo.png", scale=4, steps=3)
        assert status == 201, job
        assert job["name"] == "my photo.png" and job["state"] in ("queued", "running")
        assert "input_file" not in job  # no server paths in the API
        done = wait_for(server, job["id"], lambda j: j["state"] in ("done", "failed"))
        assert done["state"] == "done", done
        assert done["progress"]["fraction"] == 1.0 and done["progress"]["step"] == 3 and done["preview"] == 3
        status, headers, body = request(server.url + done["result_url"].lstrip("/"))
        assert status == 200 and \
            headers["content-disposition"] == "attachment; filename*=utf-8''my%20photo_infdit.png"
        assert np.array_equal(pixels(body), pixels(ref))  # the same image `infdit upscale` writes
        status, headers, body = request(server.url + done["preview_url"].lstrip("/"))
        assert status == 200 and headers["content-type"] == "image/jpeg" and \
            pixels(body).shape == (160, 192, 3)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
                n == "job" and d["id"] == job["id"] and d["state"] == "done" for n, d in events.seen):
            time.sleep(0.1)
        names = [n for n, d in events.seen if d.get("job", d.get("id")) == job["id"]]
        assert names.count("StepDone") == 3 and "JobStarted" in names and "PassDone" in names
        fractions = [d["progress"]["fraction"] for n, d in events.seen if n == "job" and d["id"] == job["id"]]
        assert fractions[-1] == 1.0 and fractions == sorted(fractions) and len(set(fractions)) >= 3
        # A second server on the same jobs folder is refused at once, before any weights load.
        res = run_cli("serve", "--port", "0", "--jobs", tmp_path / "jobs", "--weights", tiny_weights, env=ENV,
                      timeout=60, process=True)
        assert res.returncode == 1 and res.stderr.strip().startswith(
            f"error: another infdit serve is using the jobs folder {tmp_path / 'jobs'} (pid "), res.stderr
        # Delete: the job's folder goes; an unknown job is 404.
        status, _, _ = request(server.url + f"api/jobs/{job['id']}", method="DELETE")
        assert status == 204 and not (tmp_path / "jobs" / job["id"]).exists()
        assert get_json(server, f"api/jobs/{job['id']}")[0] == 404
        _cancel_a_running_and_a_queued_job(server, tmp_path)  # on the same server: one start less
    finally:
        assert server.stop() in (0, 143), server.stderr()
    assert "Traceback" not in server.stderr()


def _cancel_a_running_and_a_queued_job(server: Server, tmp_path: Path) -> None:
    src = image(tmp_path / "wide.png", 64, 200)
    _, running = post_image(server, "api/jobs", src, scale=4, steps=200)
    _, queued = post_image(server, "api/jobs", src, scale=4, steps=200)
    wait_for(server, running["id"], lambda j: j["progress"]["step"] >= 1)
    assert get_json(server, f"api/jobs/{running['id']}")[1]["position"] == 0
    assert get_json(server, f"api/jobs/{queued['id']}")[1]["position"] == 1
    status, _, body = request(server.url + f"api/jobs/{running['id']}/result")
    assert status == 409 and json.loads(body)["error"].endswith("its result is there when it is done")
    for job in (queued, running):
        status, _, body = request(server.url + f"api/jobs/{job['id']}/cancel", method="POST")
        assert status == 200, body
    for job in (queued, running):
        got = wait_for(server, job["id"], lambda j: j["state"] != "running", timeout=30)
        assert got["state"] == "cancelled" and got["result_url"] is None
        assert not (tmp_path / "jobs" / job["id"] / "run").exists()  # its checkpoints are gone
    status, _, body = request(server.url + f"api/jobs/{running['id']}/cancel", method="POST")
    assert status == 400 and json.loads(body) == {
        "error": f"job {running['id']} is cancelled; only a queued or running job can be cancelled",
        "exit_code": 2}


def post_json(server: Server, path: str, body: dict):
    status, _, out = request(server.url + path, method="POST", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
    return status, json.loads(out)


@pytest.mark.slow
def test_bad_uploads_are_one_json_error_and_leave_nothing(tmp_path, tiny_weights, cache):
    photos = tmp_path / "photos"
    photos.mkdir()
    image(photos / "ok.png", 30, 30)
    image(tmp_path / "secret.png", 30, 30)
    (photos / "escape.png").symlink_to(tmp_path / "secret.png")
    server = Server(tmp_path / "jobs", tiny_weights, "--max-bytes", "50KB", "--max-pixels", "4000",
                    "--allow-paths", str(photos), cache=cache)
    try:
        # --allow-paths: a file under the folder is planned like an upload; nothing outside it, links
        # included.
        status, plan = post_json(server, "api/plan", {"path": "ok.png", "scale": 4})
        assert status == 200 and plan["output_size"] == [120, 120] and plan["name"] == "ok.png"
        for path in ("../secret.png", "escape.png", str(tmp_path / "secret.png")):
            status, body = post_json(server, "api/jobs", {"path": path, "scale": 4})
            assert status == 400 and \
                body["error"].endswith("is outside the folder the server allows (--allow-paths)")
        assert post_json(server, "api/jobs", {"path": "nope.png", "scale": 4}) == (
            415, {"error": "no such file under --allow-paths: nope.png", "exit_code": 1})
        cases = [
            (b"this is not an image", {"scale": 4}, 415, "photo.png is not an image Pillow can read"),
            (image(tmp_path / "big.png", 80, 80).read_bytes(), {"scale": 4}, 413,
             "photo.png has more than 4000 pixels; raise --max-pixels if it is trusted"),
            (os.urandom(60_000), {"scale": 4}, 413, None),  # over --max-bytes
            (image(tmp_path / "ok.png", 30, 30).read_bytes(), {"scale": 0.5}, 400,
             "--scale must be greater than 1, got 0.5"),
            (image(tmp_path / "ok2.png", 30, 30).read_bytes(), {"scale": 4, "steps": "many"}, 400,
             "steps must be an integer, got 'many'"),
            (image(tmp_path / "ok3.png", 30, 30).read_bytes(), {"res": "4096", "scale": 2}, 400, None),
            (b"", {"scale": 4}, 415, "photo.png is empty (0 bytes)"),
        ]
        for data, fields, status, message in cases:
            for path in ("api/plan", "api/jobs"):
                got, body = post_image(server, path, data, **fields)
                assert got == status, (fields, body)
                assert set(body) == {"error", "exit_code"} and "\n" not in body["error"], body
                if message is not None:
                    assert body["error"] == message
        assert "upload is" in post_image(server, "api/jobs", os.urandom(60_000), scale=4)[1]["error"]
        # A page of another site cannot submit through this machine's browser.
        got, body = post_image(server, "api/jobs", image(tmp_path / "x.png", 20, 20), scale=4,
                               headers={"Origin": "http://evil.example"})
        assert got == 403 and body["error"] == "refused: a request from a page of another site"
        assert get_json(server, "api/jobs")[1] == {"jobs": []}
        assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == [".infdit", "lock"]  # nothing kept
    finally:
        server.stop()
    assert "Traceback" not in server.stderr()


# A network bind needs the token: tests/test_serve_guard.py (one server with --allow-host too).


@pytest.mark.slow
def test_a_job_survives_sigkill_of_its_server_and_ends_identical(tmp_path, tiny_weights, cache):
    src = image(tmp_path / "wide.png", 48, 96, seed=3)
    ref = tmp_path / "ref.png"
    run_cli("upscale", src, "-o", ref, "--scale", "4", "--steps", "30", "--seed", "7", "--device", "cpu",
            "--weights", tiny_weights, "-q", "--no-checkpoint", check=True,
            env={**ENV, "INFDIT_CACHE": str(cache)})
    jobs = tmp_path / "jobs"
    server = Server(jobs, tiny_weights, cache=cache)
    try:  # SIGTERM: a clean stop; the job waits, queued, for the next start
        _, job = post_image(server, "api/jobs", src, scale=4, steps=30, seed=7)
        first = wait_for(server, job["id"], lambda j: j["progress"]["step"] >= 2)
    finally:
        assert server.stop(signal.SIGTERM) == 143
    assert server.stderr().splitlines()[1:] == [
        "error: terminated by SIGTERM; the server stopped, 1 job(s) wait for its next start"]
    assert json.loads((jobs / job["id"] / "job.json").read_text())["state"] == "queued"
    server = Server(jobs, tiny_weights, cache=cache)
    try:  # SIGKILL: no clean-up at all
        before = wait_for(server, job["id"], lambda j: j["progress"]["step"] >= first["progress"]["step"] + 2)
        assert before["state"] == "running" and before["resumed"]["step"] >= 2
    finally:
        server.stop(signal.SIGKILL)
    # as the kill left it
    assert json.loads((jobs / job["id"] / "job.json").read_text())["state"] == "running"
    server = Server(jobs, tiny_weights, cache=cache)
    try:
        done = wait_for(server, job["id"], lambda j: j["state"] in ("done", "failed"))
        assert done["state"] == "done", done
        assert done["resumed"]["pass"] == 1 and done["resumed"]["step"] >= 4  # it continued, not started over
        _, _, body = request(server.url + done["result_url"].lstrip("/"))
        assert np.array_equal(pixels(body), pixels(ref))
        assert done["started"] == before["started"] and \
            done["progress"]["elapsed"] >= before["progress"]["elapsed"]
    finally:
        server.stop()


def test_without_the_serve_extra_it_says_how_to_install(tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "fastapi.py").write_text("raise ImportError('blocked for the test')\n")
    res = subprocess.run([sys.executable, "-m", "infdit_cli", "serve"], capture_output=True, text=True,
                         env={**ENV, "PYTHONPATH": str(blocker)}, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == ('error: infdit serve needs the web server packages: '
                                  'pip install fastapi uvicorn python-multipart '
                                  '(the serve extra: pip install ".[serve]" in the infdit clone)')


def test_options_are_checked_like_the_cli():
    from infdit_cli.errors import BadRequest
    from infdit_cli.serve.jobs import JobOptions

    assert JobOptions(scale=4, format="JPEG".lower()).check().format == "jpg"
    for bad, message in [(JobOptions(), "give a target"), (JobOptions(res="4096", scale=2), "give a target"),
                         (JobOptions(scale=4, steps=0), "steps must be 1 to 1000"),
                         (JobOptions(scale=4, format="gif"), "format must be one of"),
                         (JobOptions(scale=4, color_fix="x"), "color_fix must be")]:
        with pytest.raises(BadRequest, match=message):
            bad.check()


def test_the_jobs_folder_trusts_only_what_it_made(tmp_path):
    from infdit_cli.errors import Busy, UnsafePath
    from infdit_cli.serve.jobs import Job, JobOptions, JobStore

    store = JobStore(tmp_path / "jobs")
    with pytest.raises(Busy, match="another infdit serve is using the jobs folder"):
        JobStore(tmp_path / "jobs")  # the lock is per open folder: a second server, here in-process
    good, damaged, linked = "20261205-120000-aaaaaa", "20261205-120001-bbbbbb", "20261205-120002-cccccc"
    for job_id in (good, damaged):
        store.job_folder(job_id).close()
    job = Job(id=good, name="a.png", options=JobOptions(scale=4), input_file="input.png", input_size=(8, 8),
              output_size=(32, 32), predicted_seconds=1.0, plan_lines=[], created=1.0, state="running",
              started=2.0)
    store.save(job)
    (tmp_path / "jobs" / damaged / "job.json").write_text('{"id": "20261205-120001-bbbbbb", "sta')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "jobs" / linked).symlink_to(elsewhere, target_is_directory=True)
    (tmp_path / "jobs" / "notes.txt").write_text("a user's file")
    store.close()
    store = JobStore(tmp_path / "jobs")
    try:
        assert list(store.jobs) == [good] and store.jobs[good].state == "queued"  # it was running: resumes
        assert len(store.skipped) == 2
        assert store.skipped[0].startswith(
            f"left {tmp_path / 'jobs' / damaged} alone: its job.json is damaged")
        assert store.skipped[1].startswith(f"left {tmp_path / 'jobs' / linked} alone: job folder ")
        assert "is a symbolic link" in store.skipped[1]
    finally:
        store.close()
    assert (tmp_path / "jobs" / "notes.txt").read_text() == "a user's file" and elsewhere.is_dir()
    (tmp_path / "link").symlink_to(tmp_path / "jobs", target_is_directory=True)
    with pytest.raises(UnsafePath, match="is a symbolic link"):
        JobStore(tmp_path / "link")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "photo.png").write_bytes(b"x")
    with pytest.raises(UnsafePath, match="has no .infdit marker"):
        JobStore(plain)  # a folder infdit did not make, with files in it, is never used as a jobs folder
    (plain / "photo.png").unlink()
    JobStore(plain).close()  # an empty one (`mkdir jobs` first) is taken
