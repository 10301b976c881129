"""`infdit serve` on a shared machine (issue 30), against real server processes on 127.0.0.1: the Host
allow-list (DNS rebinding), `--allow-host` with the token, `--allow-paths` against a folder swapped for a
link while requests run, every client mistake a 4xx with one JSON line (never 500, no traceback, no server
path), a full disk 507, the queue limit 429, the decode budget's peak memory, and the marker that stays
proportional to what exists."""

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image
from test_serve import Server, get_json, image, multipart, post_image, request, wait_for

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def raw(server: Server, method: str, path: str, body: bytes | None = None, *, host: str | None = "default",
        headers: dict | None = None, chunked: bool = False):
    """One request with exactly these headers (Host included): (status, headers, body)."""
    u = urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        conn.putrequest(method, "/" + path.lstrip("/"), skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", u.netloc if host == "default" else host)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        elif body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        try:
            if chunked:
                for i in range(0, len(body), 8192):
                    piece = body[i:i + 8192]
                    conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                conn.send(b"0\r\n\r\n")
            elif body:
                conn.send(body)
        except (BrokenPipeError, ConnectionResetError):  # the server answered (413) before the end
            pass
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def one_line(status: int, body: bytes) -> dict:
    out = json.loads(body)
    assert set(out) == {"error", "exit_code"} and "\n" not in out["error"], out
    return out


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, tiny_weights):
    """A loopback server with --allow-paths, a 150 KB upload limit and a queue of one."""
    root = tmp_path_factory.mktemp("guard")
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    image(photos / "sub" / "ok.png", 30, 30)
    (root / "outside").mkdir()
    image(root / "outside" / "ok.png", 20, 24, seed=1)
    server = Server(root / "jobs", tiny_weights, "--allow-paths", str(photos), "--max-bytes", "150KB",
                    "--max-queue", "1", cache=tmp_path_factory.getbasetemp() / "serve-cache")
    server.root = root
    yield server
    server.stop()
    assert "Traceback" not in server.stderr()


def test_a_foreign_host_is_refused_on_a_loopback_bind(guarded):
    server, port = guarded, urlsplit(guarded.url).port
    src = image(guarded.root / "h.png", 20, 20)
    body, h = multipart({"scale": "4"}, ("h.png", src.read_bytes()))
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.nip.example:{port}",
                 f"localhost.:{port}"):
        for origin in (None, f"http://{host}"):
            extra = {"Origin": origin} if origin else {}
            status, _, out = raw(server, "GET", "api/jobs", host=host, headers=extra)
            assert status == 403 and one_line(status, out)["error"] == (  # not the names it answers to
                f"refused: Host {host!r} is not a name of this server (see --allow-host)"), out
            status, _, out = raw(server, "POST", "api/jobs", body, host=host, headers={**h, **extra})
            assert status == 403, out
            one_line(status, out)
    assert raw(server, "GET", "api/jobs", host="")[0] == 400  # an empty Host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost", f"LOCALHOST:{port}"):
        status, headers, out = raw(server, "GET", "", host=host)
        assert status == 200 and b"<html" in out.lower() and headers["referrer-policy"] == "no-referrer"
        status, _, out = raw(server, "POST", "api/plan", body, host=host,
                             headers={**h, "Origin": f"http://{host}"})
        assert status == 200 and json.loads(out)["input_size"] == [20, 20], out
    assert json.loads(raw(server, "GET", "api/jobs")[2]) == {"jobs": []}


def test_every_bad_request_is_a_4xx_line_and_names_no_server_path(guarded):
    server, root = guarded, str(guarded.root)
    big = os.urandom(200_000)
    form, h = multipart({"scale": "4"}, ("big.png", big))
    js = {"Content-Type": "application/json"}
    cases = [  # (method, path, body, headers, chunked, status)
        ("POST", "api/jobs", form, h, True, 413),  # chunked, over --max-bytes
        ("POST", "api/plan", json.dumps({"path": "x" * 200_000}).encode(), js, True, 413),
        ("POST", "api/plan", b'{"path": ', js, False, 400),
        ("POST", "api/plan", b"[" * 100_000, js, False, 400),  # deeper than the JSON parser goes
        ("POST", "api/plan", b"[" * 100_000, js, True, 400),
        ("POST", "api/plan", b"\xff\xfe", js, False, 400),
        ("POST", "api/plan", json.dumps({"path": "sub/a\x00b.png", "scale": 4}).encode(), js, False, 400),
        ("POST", "api/plan", b'{"path": "sub/\\ud800.png", "scale": 4}', js, False, 400),
        ("POST", "api/plan", json.dumps({"path": "sub/../../outside/ok.png", "scale": 4}).encode(), js, False,
         400),
        ("POST", "api/plan", json.dumps({"path": f"{root}/outside/ok.png", "scale": 4}).encode(), js, False,
         400),
        ("POST", "api/plan", json.dumps({"path": ".", "scale": 4}).encode(), js, False, 400),
        ("POST", "api/plan", json.dumps({"path": "sub", "scale": 4}).encode(), js, False, 415),
        ("POST", "api/plan", json.dumps({"path": "sub/pixels.png", "scale": 4}).encode(), js, False, 415),
        ("POST", "api/plan", json.dumps({"path": "sub/ok.png/x", "scale": 4}).encode(), js, False, 415),
        ("POST", "api/plan", json.dumps({"path": "a" * 5000, "scale": 4}).encode(), js, False, 400),
        ("POST", "api/plan", json.dumps({"path": "sub/ok.png", "scale": [1, {}]}).encode(), js, False, 400),
        ("POST", "api/plan", json.dumps({"path": "sub/ok.png", "scale": "nan"}).encode(), js, False, 400),
        ("POST", "api/plan", json.dumps({"path": "sub/ok.png", "steps": 10**30, "scale": 4}).encode(), js,
         False, 400),
        ("POST", "api/plan", b"--x\r\nbroken", {"Content-Type": "multipart/form-data; boundary=x"}, False,
         400),
        ("POST", "api/jobs", form[:100], {"Content-Type": "multipart/form-data"}, False, 400),
        ("POST", "api/jobs", b"{}", {**js, "Origin": "http://["}, False, 403),
        ("GET", "api/jobs/..%2f..%2fetc", None, {}, False, 404),
        ("GET", "api/jobs/20261205-120000-aaaaaa/result", None, {}, False, 404),
    ]
    for method, path, body, headers, chunked, status in cases:
        got, _, out = raw(server, method, path, body, headers=headers, chunked=chunked)
        assert got == status, (path, body[:60] if body else None, out)
        err = one_line(got, out)
        # the server's
        assert f"{root}/jobs" not in err["error"] and f"{root}/photos" not in err["error"], err
    assert "Traceback" not in server.stderr() and "internal error" not in server.stderr()
    assert json.loads(raw(server, "GET", "api/jobs")[2]) == {"jobs": []}
    assert sorted(p.name for p in (guarded.root / "jobs").iterdir()) == [".infdit", "lock"]  # nothing kept


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _done_job(server: Server, src: Path, name: str) -> dict:
    status, job = post_image(server, "api/jobs", src, name=name, scale=4, steps=1)
    assert status == 201, job
    return wait_for(server, job["id"], lambda j: j["state"] in ("done", "failed"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/PID/fd")
def test_a_client_gone_before_the_answer_leaves_no_descriptor_open(guarded):
    import socket

    server = guarded
    done = _done_job(server, image(guarded.root / "fd.png", 16, 16), "fd.png")
    try:
        assert done["state"] == "done", done
        u = urlsplit(server.url)
        for path in (done["result_url"], done["preview_url"]):
            assert raw(server, "GET", path)[0] == 200
        before = _fds(server.proc.pid)
        for i in range(60):  # the request, then the client is gone before any answer byte is read
            with socket.create_connection((u.hostname, u.port)) as s:
                path = (done["result_url"], done["preview_url"])[i % 2]
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\n\r\n".encode())
        assert raw(server, "GET", "api/jobs")[0] == 200  # every request above has been taken up
        time.sleep(1.0)
        assert _fds(server.proc.pid) <= before + 5, (before, _fds(server.proc.pid))
    finally:
        assert raw(server, "DELETE", f"api/jobs/{done['id']}")[0] == 204


def test_notices_name_the_upload_not_a_server_path(guarded):
    server, root = guarded, str(guarded.root)
    frames = [Image.new("RGB", (12, 10), c) for c in ("red", "blue")]
    frames[0].save(guarded.root / "two.gif", save_all=True, append_images=frames[1:])
    status, plan = post_image(server, "api/plan", guarded.root / "two.gif", name="two.gif", scale=4)
    assert status == 200 and plan["warnings"] == ["two.gif has 2 frames; only the first is upscaled"], plan
    done = _done_job(server, guarded.root / "two.gif", "two.gif")
    try:
        assert done["warnings"] and all(root not in w and "/jobs" not in w for w in done["warnings"]), done
        assert "two.gif has 2 frames; only the first is upscaled" in done["warnings"], done
    finally:
        assert raw(server, "DELETE", f"api/jobs/{done['id']}")[0] == 204


def test_allow_paths_never_reads_through_a_swapped_link(guarded):
    server, photos, outside = guarded, guarded.root / "photos", guarded.root / "outside"
    js = {"Content-Type": "application/json"}
    body = json.dumps({"path": "sub/ok.png", "scale": 4}).encode()
    status, _, out = raw(server, "POST", "api/plan", body, headers=js)
    assert status == 200 and json.loads(out)["input_size"] == [30, 30]
    stop = threading.Event()
    flips = [0]
    os.symlink(outside, photos / "sub.link")
    exchange = _renameat2_exchange()

    def flip():  # `sub` is the folder, then a link to the folder outside, and back, as fast as it goes
        while not stop.is_set():
            if exchange is not None:  # one atomic swap: `sub` is always one or the other
                exchange(photos / "sub", photos / "sub.link")
            else:
                os.rename(photos / "sub", photos / "sub.real")
                os.rename(photos / "sub.link", photos / "sub")
                os.rename(photos / "sub", photos / "sub.link")
                os.rename(photos / "sub.real", photos / "sub")
            flips[0] += 1

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: raw(server, "POST", "api/plan", body, headers=js), range(300)))
    finally:
        stop.set()
        flipper.join()
        # the renames' loop ends with `sub` a folder
        if exchange is not None and (photos / "sub").is_symlink():
            exchange(photos / "sub", photos / "sub.link")
        (photos / "sub.link").unlink()
    sizes = [json.loads(out)["input_size"] for status, _, out in answers if status == 200]
    refused = [one_line(s, out)["error"] for s, _, out in answers if s != 200]
    assert [20, 24] not in sizes  # the outside file's size: never read
    assert sizes and all(s == [30, 30] for s in sizes) and refused and flips[0] > 100, \
        (len(sizes), refused[:3])
    assert all(e in ("sub/ok.png is outside the folder the server allows (--allow-paths)",
                     "no such file under --allow-paths: sub/ok.png") for e in refused), set(refused)
    assert (guarded.root / "jobs" / ".infdit").stat().st_size < 2 * 4096  # 300+ temporary names, compacted


def _renameat2_exchange():
    """renameat2(RENAME_EXCHANGE) through libc (Linux), or None."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None

    def exchange(a: Path, b: Path) -> None:
        if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) != 0:  # AT_FDCWD, RENAME_EXCHANGE
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(a))

    return exchange


def test_the_queue_limit_answers_429(guarded):
    server = guarded
    src = image(guarded.root / "q.png", 64, 64)
    status, running = post_image(server, "api/jobs", src, scale=4, steps=1000)
    assert status == 201, running
    wait_for(server, running["id"], lambda j: j["state"] == "running", timeout=60)
    status, queued = post_image(server, "api/jobs", src, scale=4, steps=1000)
    assert status == 201 and queued["state"] == "queued", queued
    status, body = post_image(server, "api/jobs", src, scale=4, steps=1000)
    assert status == 429 and body == {"error": "the queue is full (1 jobs wait; this server takes at most 1, "
                                               "--max-queue): try again when some have run", "exit_code": 1}
    for job in (queued, running):
        assert raw(server, "POST", f"api/jobs/{job['id']}/cancel")[0] == 200
        wait_for(server, job["id"], lambda j: j["state"] == "cancelled", timeout=60)
    assert post_image(server, "api/plan", src, scale=4)[0] == 200  # plans are not queued jobs


def test_a_network_bind_needs_the_token_and_allow_host_still_does(tmp_path, tiny_weights, tmp_path_factory):
    server = Server(tmp_path / "jobs", tiny_weights, "--host", "0.0.0.0", "--allow-host", "infdit.test",
                    cache=tmp_path_factory.getbasetemp() / "serve-cache")
    try:
        assert server.token and len(server.token) >= 24  # made and printed once
        status, body = get_json(server, "api/jobs")
        assert status == 401 and body["error"].startswith("this server needs its token")
        assert request(server.url)[0] == 401  # the page too
        assert get_json(server, "api/jobs", headers={"Authorization": "Bearer wrong-token"})[0] == 401
        assert get_json(server, "api/jobs", headers={"Authorization": f"Bearer {server.token}"})[0] == 200
        assert get_json(server, f"api/jobs?token={server.token}")[0] == 200
        status, _, out = request(server.url + f"api/plan?token={server.token}", method="POST", data=b"{}",
                                 headers={"Content-Type": "application/json"})
        assert status == 400 and json.loads(out)["error"].startswith("this server takes uploads only")
        assert post_image(server, "api/plan", image(tmp_path / "a.png", 20, 20), scale=4)[0] == 401
        # --allow-host adds names it answers to; every one of them still needs the token
        port, auth = urlsplit(server.url).port, {"Authorization": f"Bearer {server.token}"}
        for host in (f"infdit.test:{port}", "INFDIT.test", f"127.0.0.1:{port}", f"10.1.2.3:{port}", "[::1]"):
            assert raw(server, "GET", "api/jobs", host=host, headers=auth)[0] == 200, host
            assert raw(server, "GET", "api/jobs", host=host)[0] == 401, host  # the token still
        for host in (f"evil.example:{port}", f"other.infdit.test:{port}"):
            status, _, out = raw(server, "GET", "api/jobs", host=host, headers=auth)
            error = one_line(status, out)["error"]
            # the names it answers to: not told
            assert status == 403 and error.endswith("(see --allow-host)") and \
                "infdit.test" not in error.replace(host, "") and "127.0.0.1" not in error, error
    finally:
        server.stop()
    assert "Traceback" not in server.stderr()


def _can_mount_tmpfs() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    res = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                         capture_output=True)
    return res.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs a user namespace to mount a small tmpfs")
def test_a_full_disk_during_an_upload_is_507_and_names_no_path(tmp_path, tiny_weights, tmp_path_factory):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    mount = ("unshare", "-rm", "sh", "-c",
             f'mount -t tmpfs -o size=256k,mode=0700 tmpfs "{jobs}" && exec "$@"', "sh")
    server = Server(jobs, tiny_weights, cache=tmp_path_factory.getbasetemp() / "serve-cache", prefix=mount)
    try:
        data = os.urandom(400_000)
        for _ in range(2):  # the second one too (it was 422 naming the jobs folder)
            for path in ("api/plan", "api/jobs"):
                status, body = post_image(server, path, data, scale=4)
                assert status == 507 and body == {
                    "error": "the server's disk is full: nothing was stored; try again later",
                    "exit_code": 1}, body
        ok = image(tmp_path / "ok.png", 20, 20)
        assert post_image(server, "api/plan", ok, scale=4)[0] == 200  # room again once the upload is gone
    finally:
        server.stop()
    assert "Traceback" not in server.stderr()


def peak_rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def huge_pngs(folder: Path, n: int = 6) -> list[bytes]:
    """`n` PNGs of ~46 KB each, each declaring 4000x4000 (flat colour: it compresses ~1000:1)."""
    out = []
    for i in range(n):
        path = folder / f"huge{i}.png"
        Image.new("RGB", (4000, 4000), (i, 2 * i, 3 * i)).save(path, compress_level=9)
        out.append(path.read_bytes())
    return out


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_concurrent_huge_decodes_stay_under_the_pixel_budget(tmp_path, tiny_weights, tmp_path_factory):
    pngs = huge_pngs(tmp_path)
    assert all(40_000 < len(p) < 60_000 for p in pngs), [len(p) for p in pngs]
    server = Server(tmp_path / "jobs", tiny_weights, cache=tmp_path_factory.getbasetemp() / "serve-cache")
    try:
        assert post_image(server, "api/plan", image(tmp_path / "s.png", 20, 20), scale=4)[0] == 200
        base, _ = peak_rss_mb(server.proc.pid)
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda p: post_image(server, "api/plan", p, scale=2), pngs))
        assert all(s == 200 and b["input_size"] == [4000, 4000] for s, b in answers), answers
        _, peak = peak_rss_mb(server.proc.pid)
        print(f"\nserver RSS before {base:.0f} MB, peak {peak:.0f} MB during six concurrent 4000x4000 plans")
    finally:
        server.stop()
    # One 16-Mpixel decode and plan: +1.1 GB measured here; six at once without the budget: +4.0 GB.
    assert peak - base < 1500, (base, peak)
    assert "Traceback" not in server.stderr()


def test_serve_options_are_one_line_and_exit_2(tmp_path):
    from infdit_cli.cli.serve import check_serve_args
    from infdit_cli.errors import BadRequest

    good = dict(host="127.0.0.1", token=None, allow_paths=None, allow_host=[], max_bytes="100MB",
                mem_budget=None, device="cpu", dtype="auto")
    assert check_serve_args(**good) == (100 * 2**20, {"127.0.0.1", "localhost", "::1"})
    assert check_serve_args(**{**good, "host": "192.168.1.5", "allow_host": ["Box.lan", "[fe80::1]"]})[1] == {
        "127.0.0.1", "localhost", "::1", "192.168.1.5", "box.lan", "fe80::1"}
    for change, message in [({"max_bytes": "xx"}, "--max-bytes must be a size like 100MB or 2GB, got 'xx'"),
                            ({"max_bytes": "-5"}, "--max-bytes must be a size like 100MB or 2GB, got '-5'"),
                            ({"max_bytes": "0.1"}, "--max-bytes must be at least 1 byte, got '0.1'"),
                            ({"mem_budget": "lots"}, "--mem-budget: not a memory size: 'lots'"),
                            ({"host": " "}, "--host must be an address or a name"),
                            ({"token": "short"}, "--token must be at least 8 characters"),
                            ({"token": "has a space"}, "--token must be printable characters without spaces"),
                            ({"allow_paths": tmp_path / "nope"},
                             f"--allow-paths {tmp_path / 'nope'} is not a folder"),
                            ({"allow_host": ["http://box"]},
                             "--allow-host takes a host name or an IP address"),
                            ({"allow_host": ["box:80"]}, "--allow-host takes a host name or an IP address"),
                            ({"device": "tpu"}, "unknown device 'tpu'"),
                            ({"dtype": "fp8"}, "unknown dtype 'fp8'")]:
        with pytest.raises(BadRequest) as e:
            check_serve_args(**{**good, **change})
        assert str(e.value).startswith(message) and "\n" not in str(e.value)
    jobs = tmp_path / "jobs"
    for value in ("xx", "-5"):  # through the command: before any folder is made or weights are read
        res = subprocess.run([sys.executable, "-m", "infdit_cli", "serve", "--jobs", str(jobs), "--max-bytes",
                              value], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert (res.returncode, res.stderr) == (2,
                                                f"error: --max-bytes must be a size like 100MB or 2GB, got "
                                                   f"'{value}'\n") and not jobs.exists()


def test_the_marker_stays_proportional_to_what_exists(tmp_path):
    from infdit_cli.engine.storage import COMPACT_AT, MARKER, SafeFolder

    folder = SafeFolder(tmp_path / "f", "jobs folder")
    try:
        os.close(folder.create("lock"))
        folder.record("pending.png")  # recorded before it is made: a rewrite must keep it
        for _ in range(500):  # uploads: a temporary name each, gone again
            tmp, fd = folder.temp("upload")
            os.close(fd)
            folder.unlink(tmp)
            folder.write("job.json", b"{}")  # a temporary name, renamed over job.json
        size = (tmp_path / "f" / MARKER).stat().st_size
        assert size <= COMPACT_AT, size  # 1000 temporary names were ~40 KB of lines
        assert {"lock", "pending.png", "job.json"} <= set(folder.records())
        assert folder.compact() and folder.records() == ["lock", "pending.png", "job.json"]
        assert (tmp_path / "f" / MARKER).read_text().startswith("infdit jobs folder\n\n+")
        (tmp_path / "f" / "pending.png").write_bytes(b"x")
        (tmp_path / "f" / "user.txt").write_text("not infdit's")
        assert not folder.remove()  # the recorded names go, the user's file and so the folder stay
        assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["user.txt"]
    finally:
        folder.close()
    scratch = SafeFolder(tmp_path / "s", "scratch folder", pid=True)
    try:
        assert not scratch.compact()  # a scratch marker is its owner's lock: never replaced
    finally:
        scratch.close()


def test_a_loopback_bind_answers_the_address_it_prints(tmp_path, tiny_weights, tmp_path_factory):
    """--host 127.0.0.2 (Linux routes all of 127/8 to lo): the printed address is one its Host check takes."""
    server = Server(tmp_path / "jobs", tiny_weights, "--host", "127.0.0.2",
                    cache=tmp_path_factory.getbasetemp() / "serve-cache")
    try:
        assert urlsplit(server.url).hostname == "127.0.0.2" and server.token is None, server.stderr()
        status, _, out = raw(server, "GET", "api/jobs")  # Host: 127.0.0.2:PORT, as printed
        assert status == 200 and json.loads(out) == {"jobs": []}, out
        assert raw(server, "GET", "api/jobs", host="localhost")[0] == 200
    finally:
        server.stop()
    assert "Traceback" not in server.stderr()
