"""State on disk that cannot hurt the user (issue 21), each case through the CLI as a user meets it:
links and foreign things at the run-folder path, links planted inside it, damaged or out-of-range
checkpoints, a full disk under --low-memory, SIGTERM/SIGHUP, stale scratch folders, two runs to one output,
NaN results, and the signal tests started from a background job."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import default_signals, run_cli
from PIL import Image
from test_resume import ARGS, STEPS, _saved, _start, _stop_at, rgb_image

from infdit_cli.jobs.checkpoint import run_folder_for


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[-1]


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_weights, reference_job):
    """An input, the bytes of an uninterrupted run (the session's reference job), and a run folder stopped
    by SIGTERM at pass 1 step 2 (kept as a template: each test gets its own copy)."""
    src, ref = reference_job
    d = tmp_path_factory.mktemp("job")
    out = d / "stopped" / "out.png"
    out.parent.mkdir()
    folder = run_folder_for(out)
    proc = _start(src, out, tiny_weights, "--checkpoint")
    err = _stop_at(proc, folder, (1, 2), signal.SIGTERM)
    return src, ref, folder, proc.returncode, err


def _copy_run(job, tmp_path) -> tuple[Path, Path]:
    out = tmp_path / "out.png"
    folder = run_folder_for(out)
    shutil.copytree(job[2], folder, symlinks=True)
    return out, folder


def _rerun(src, out, weights, *extra):
    return run_cli("upscale", src, "-o", out, *ARGS, "--weights", weights, *extra)


def _rerun_here(monkeypatch, capsys, src, out, weights, *extra) -> subprocess.CompletedProcess:
    """`infdit upscale` through the CLI's own `main`, in this process (no interpreter start per case)."""
    from infdit_cli.cli.app import main

    monkeypatch.setattr(sys, "argv", ["infdit", "upscale", str(src), "-o", str(out), *ARGS, "--weights",
                                      str(weights), *extra])
    monkeypatch.delenv("INFDIT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        main()
    o, err = capsys.readouterr()
    return subprocess.CompletedProcess([], e.value.code, o, err)


# -- 6. SIGTERM and SIGHUP -------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_keeps_the_checkpoint_and_resumes_bit_identical(job, tmp_path, tiny_weights):
    src, ref, template, rc, err = job
    assert rc == 143, err
    last = _one_line(err)
    saved = _saved(template)
    assert last.startswith("error: terminated by SIGTERM; ") and \
        "run the same command again to resume" in last
    assert f"pass {saved[0]}/2, step {saved[1]}/{STEPS} saved in {template}" in last
    assert not (template.parent / "out.png").exists()
    assert not any(p.name.endswith(".infdit-lock") for p in template.parent.iterdir())  # the lock is released
    out, _ = _copy_run(job, tmp_path)
    res = _rerun(src, out, tiny_weights)
    assert res.returncode == 0, res.stderr
    assert f"resuming at pass {saved[0]}/2, step {saved[1]}/{STEPS}" in res.stderr
    assert out.read_bytes() == ref
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


@pytest.mark.slow
def test_sighup_is_handled_like_ctrl_c(job, tmp_path, tiny_weights):
    src, ref = job[:2]
    out = tmp_path / "out.png"
    folder = run_folder_for(out)
    proc = _start(src, out, tiny_weights, "--checkpoint")
    err = _stop_at(proc, folder, (2, 1), signal.SIGHUP)
    assert proc.returncode == 129, err
    assert _one_line(err).startswith("error: terminated by SIGHUP; pass 2/2, step ")
    res = _rerun(src, out, tiny_weights)
    assert res.returncode == 0 and "resuming at pass 2/2" in res.stderr, res.stderr
    assert out.read_bytes() == ref


# -- 1. a link or a foreign thing at the run-folder path ---------------------------------------------------

@pytest.mark.parametrize("what", ["link", "file", "foreign-folder"])
def test_a_run_folder_path_that_is_not_ours_is_refused_and_left_alone(job, tmp_path, tiny_weights, what,
                                                                       monkeypatch, capsys):
    src = job[0]
    out = tmp_path / "out.png"
    folder = run_folder_for(out)
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "meta.json").write_text("my own notes")
    (victim / "photo.raw").write_bytes(b"\x01" * 1000)
    (victim / "sub").mkdir()
    (victim / "sub" / "deep.txt").write_text("deep")
    if what == "link":
        folder.symlink_to(victim, target_is_directory=True)
    elif what == "file":
        folder.write_text("a file of mine")
    else:
        victim.rename(folder)
        victim = folder
    before = {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()} if victim.is_dir() else None
    for extra in ((), ("--checkpoint",), ("--no-resume",)):  # the default turns checkpoints on: it exists
        res = _rerun_here(monkeypatch, capsys, src, out, tiny_weights, *extra)
        assert res.returncode == 1, res.stderr
        last = _one_line(res.stderr)
        assert last.startswith(f"error: run folder {folder} "), last
        assert {"link": "is a symbolic link", "file": "is not a folder",
                "foreign-folder": "has no .infdit marker"}[what] in last
        assert not out.exists()
    if before is not None:
        assert {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()} == before  # all intact
    else:
        assert folder.read_text() == "a file of mine"
    if what == "link":
        assert folder.is_symlink()
    res = _rerun_here(monkeypatch, capsys, src, out, tiny_weights, "--no-checkpoint")  # the README's way out
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == job[1]


# -- 2. links planted inside a real run folder -------------------------------------------------------------

def _plant(folder: Path, victims: Path, names: list[str]) -> dict[str, bytes]:
    victims.mkdir()
    for i, name in enumerate(names):
        v = victims / f"v{i}"
        v.write_bytes(bytes([i + 1]) * 4096)
        (folder / name).unlink(missing_ok=True)
        (folder / name).symlink_to(v)
    return _files(victims)


@pytest.mark.parametrize("mode", ["ram", "low-memory"])
def test_links_planted_where_infdit_writes_are_not_followed(job, tmp_path, tiny_weights, mode):
    """Links at the names a resumed run writes: the fixed temporary names of before (`x.p1.s3.bin.tmp`,
    `meta.json.tmp`), and under --low-memory the state files it maps and pass 2's input. No target is
    written, the result is exact; links at names infdit never uses stay where they are (and keep the folder,
    with a warning)."""
    src, ref = job[:2]
    out, folder = _copy_run(job, tmp_path)
    saved = _saved(folder)
    if mode == "ram":
        names = ["meta.json.tmp", "input.p2.bin.tmp"] + [f"x.p{p}.s{k}.bin.tmp"
                                                         for p in (1, 2) for k in range(1, 5)]
    else:
        names = ["p1_heun_x.bin", "p1_heun_x2.bin", "p1_heun_d.bin", "p2_heun_x.bin", "p2_heun_den.bin"]
        if saved[0] == 1:
            names.append("input.p2.bin")
    before = _plant(folder, tmp_path / "victims", names)
    res = _rerun(src, out, tiny_weights, *(["--low-memory"] if mode == "low-memory" else []))
    assert res.returncode == 0, res.stderr
    assert f"resuming at pass {saved[0]}/2, step {saved[1]}/{STEPS}" in res.stderr
    assert out.read_bytes() == ref
    assert _files(tmp_path / "victims") == before  # every target unchanged
    if mode == "ram":
        assert f"warning: kept the run folder {folder}: it holds files infdit did not make" in res.stderr
        assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # only the planted links, untouched
        assert all(p.is_symlink() for p in folder.iterdir())
    else:  # each link was replaced by a file of infdit's (O_EXCL), then removed with the folder
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "victims"]


def test_a_linked_state_file_is_never_read(job, tmp_path, tiny_weights):
    """The committed x replaced by a link to a file of the right size: not read into the image (damaged),
    the link removed (never its target), a fresh exact run."""
    src, ref = job[:2]
    out, folder = _copy_run(job, tmp_path)
    x = json.loads((folder / "meta.json").read_text())["x"]
    (tmp_path / "victims").mkdir()
    victim = tmp_path / "victims" / "v"
    victim.write_bytes(bytes(x["nbytes"]))
    before = victim.read_bytes()
    (folder / x["file"]).unlink()
    (folder / x["file"]).symlink_to(victim)
    res = _rerun(src, out, tiny_weights)
    assert res.returncode == 0, res.stderr
    assert f"not resuming from {folder}: damaged: " in res.stderr
    assert out.read_bytes() == ref and victim.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "victims"]


def test_a_run_folder_with_foreign_links_is_refused(job, tmp_path, tiny_weights):
    """Links infdit did not make, at names it never records (a fixed temporary name of old versions): the
    folder cannot be replaced without deleting them, so the run is refused with one line; targets and
    links stay."""
    src = job[0]
    out, folder = _copy_run(job, tmp_path)
    x = json.loads((folder / "meta.json").read_text())["x"]["file"]
    before = _plant(folder, tmp_path / "victims", [x, "meta.json.tmp", f"{x}.tmp"])
    res = _rerun(src, out, tiny_weights, "--low-memory")
    assert res.returncode == 1, res.stderr
    assert _one_line(res.stderr) == (f"error: run folder {folder} holds files infdit did not make; they were "
                                     "left there: move them away")
    assert _files(tmp_path / "victims") == before
    assert (folder / "meta.json.tmp").is_symlink() and (folder / f"{x}.tmp").is_symlink()
    assert not out.exists()


# -- 3. and 4. damaged, out-of-range and malformed checkpoints ---------------------------------------------

def _edit(folder: Path, **fields):
    m = json.loads((folder / "meta.json").read_text())
    for k, v in fields.items():
        if "." in k:
            a, b = k.split(".")
            m[a][b] = v
        else:
            m[k] = v
    (folder / "meta.json").write_text(json.dumps(m))


DAMAGE = {
    "nan-in-x": None,  # caught by the checksum
    "nan-in-x-checksum-ok": None,  # as if written so (the checksum matches): caught by the finite check
    "pass-past-passes": {"pass": 3},
    "passes": {"passes": 1},
    "step-past-steps": {"step": STEPS + 1},
    # would write the noisy state as the result: the checksum covers the step (where the stop came late
    # enough that the saved step is already the last, the test claims an earlier one)
    "step-is-last": {"step": STEPS},
    "step-float": {"step": 2.0},  # a float where an int belongs
    "steps": {"steps": STEPS + 3},
    "fingerprint-list": {"fingerprint": []},
    "saved-at-text": {"saved_at": "yesterday"},
    "x-shape": {"x.shape": [1, 3, 8, 8]},
    "x-name": {"x.file": "../out.png"},
    "rng": {"rng": "00"},
    "x-wrong-size": "truncate",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_one_line_then_a_correct_fresh_run(job, tmp_path, tiny_weights, damage,
                                                                   monkeypatch, capsys):
    src, ref = job[:2]
    out, folder = _copy_run(job, tmp_path)
    x = folder / json.loads((folder / "meta.json").read_text())["x"]["file"]
    if damage.startswith("nan-in-x"):
        a = np.fromfile(x, dtype=np.float32)
        a[:100] = np.nan
        a.tofile(x)
        if damage == "nan-in-x-checksum-ok":
            import hashlib

            m = json.loads((folder / "meta.json").read_text())
            h = hashlib.sha256(f"infdit x pass {m['pass']} step {m['step']}\n".encode() + x.read_bytes())
            _edit(folder, **{"x.sha256": h.hexdigest()})
    elif damage == "x-wrong-size":
        with open(x, "r+b") as f:
            f.truncate(x.stat().st_size - 12)
    elif damage == "step-is-last" and json.loads((folder / "meta.json").read_text())["step"] == STEPS:
        _edit(folder, step=STEPS - 1)  # the signal reached the run only after its pass's last step
    else:
        _edit(folder, **DAMAGE[damage])
    res = _rerun_here(monkeypatch, capsys, src, out, tiny_weights)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ": damaged: " in ln]
    assert len(lines) == 1 and lines[0].startswith(f"not resuming from {folder}: damaged: "), res.stderr
    assert lines[0].endswith("; starting over")
    if damage == "nan-in-x-checksum-ok":
        assert "holds NaN or Inf" in lines[0]
    assert "resuming at" not in res.stderr and "internal error" not in res.stderr
    assert out.read_bytes() == ref  # a fresh run: identical to the uninterrupted one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # the folder is gone: no rerun loop


# -- 5. a full disk under --low-memory ---------------------------------------------------------------------

def _cli_patched(patch: str, *args, **kw) -> subprocess.CompletedProcess:
    """The CLI's main with `patch` (Python) run first: a stand-in for a full disk."""
    code = (f"import sys\n{patch}\nfrom infdit_cli.cli.app import main\n"
            "sys.argv = ['infdit'] + sys.argv[1:]\nmain()")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, **kw)


def test_full_disk_mid_run_under_low_memory_is_one_line(job, tmp_path, tiny_weights):
    """Stand-in for a disk that fills up during the job: posix_fallocate fails with ENOSPC (what it does on a
    full disk), after the plan's free-space check passed."""
    src = job[0]
    out = tmp_path / "o" / "out.png"
    out.parent.mkdir()
    patch = ("import os, errno\n"
             "def full(fd, off, n):\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
             "os.posix_fallocate = full")
    for extra in ((), ("--checkpoint",)):
        res = _cli_patched(patch, "upscale", src, "-o", out, *ARGS, "--weights", tiny_weights, "--low-memory",
                           *extra)
        assert res.returncode == 1, res.stderr
        assert _one_line(res.stderr).startswith(f"error: no space left in {out.parent}"), res.stderr
        assert list(out.parent.iterdir()) == []  # no scratch folder, no run folder, no lock, no output


def test_a_job_that_cannot_get_its_disk_is_refused_before_loading(job, tmp_path, tiny_weights):
    """A 100 KB tmpfs where it can be mounted (root, a kernel that allows it); else free space patched to
    100 KB (a stand-in). Refused with exit 2 before the weights load (the weights file given is not even
    readable as weights), need vs free and the folder in the line."""
    src = job[0]
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0 \
        if hasattr(os, "geteuid") and os.geteuid() == 0 else False
    try:
        out = disk / "out.png"
        bad_weights = tmp_path / "not-weights.safetensors"
        bad_weights.write_bytes(b"junk")
        args = ("upscale", src, "-o", out, *ARGS, "--low-memory", "--weights")
        if mounted:
            res = run_cli(*args, tiny_weights)
            res_bad = run_cli(*args, bad_weights)
        else:
            patch = ("import shutil, collections\nU = collections.namedtuple('U', 'total used free')\n"
                     "shutil.disk_usage = lambda p: U(100 << 10, 0, 100 << 10)")
            res = _cli_patched(patch, *args, tiny_weights)
            res_bad = _cli_patched(patch, *args, bad_weights)
        for r in (res, res_bad):
            assert r.returncode == 2, r.stderr
            last = _one_line(r.stderr)
            assert last.startswith(f"error: not enough disk in {disk}: the job needs "), last
            assert "scratch" in last and "KiB is free" in last
        assert list(disk.iterdir()) == []
        dry = run_cli("upscale", src, "-o", tmp_path / "x.png", *ARGS, "--low-memory", "--weights",
                      tiny_weights, "--dry-run", "--json")
        need = json.loads(dry.stdout)["disk"]
        assert need["scratch_bytes"] > 100 << 10 and need["total_bytes"] >= need["scratch_bytes"]
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


# -- 6. a stale scratch folder of a dead process -----------------------------------------------------------

def test_a_stale_scratch_folder_is_reclaimed(job, tmp_path, tiny_weights):
    src = job[0]
    out = tmp_path / "out.png"
    exe = Path(sys.executable).with_name("infdit")
    proc = subprocess.Popen([str(exe), "upscale", str(src), "-o", str(out), "--scale", "8", "--steps", "400",
                             "--device", "cpu", "--weights", str(tiny_weights), "--low-memory",
                             "--no-checkpoint"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signals)
    deadline = time.monotonic() + 60
    while not any((p / "heun_x.bin").exists() for p in tmp_path.glob(".infdit-*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.kill()  # SIGKILL: nothing runs after it
    proc.communicate()
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".infdit-")]
    assert len(stale) == 1
    alien = tmp_path / ".infdit-notours"  # same prefix, no marker: never touched
    alien.mkdir()
    (alien / "keep.txt").write_text("keep")
    res = _rerun(src, out, tiny_weights, "--low-memory")
    assert res.returncode == 0, res.stderr
    assert f"warning: removed the scratch folder {stale[0]} of a stopped run (pid {proc.pid}): " in res.stderr
    assert " KiB freed" in res.stderr
    assert out.read_bytes() == job[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".infdit-notours", "out.png"]
    assert (alien / "keep.txt").read_text() == "keep"


# -- 7. two runs to one output -----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_to_the_same_output_is_refused_at_once(job, tmp_path, tiny_weights):
    src, ref = job[:2]
    out = tmp_path / "o" / "out.png"
    out.parent.mkdir()
    folder = run_folder_for(out)
    first = _start(src, out, tiny_weights, "--checkpoint")
    deadline = time.monotonic() + 60
    while (_saved(folder) or (0, 0)) < (1, 1):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # hold the first run mid-job while the second one tries
    try:
        for cmd in (("upscale", src, "-o", out, *ARGS, "--weights", tiny_weights),
                    ("upscale", src, "-o", out, *ARGS, "--weights", tiny_weights, "--no-resume",
                     "--overwrite")):
            t0 = time.monotonic()
            res = run_cli(*cmd)
            assert res.returncode == 1, res.stderr
            assert _one_line(res.stderr) == f"error: another infdit is writing {out} (pid {first.pid})"
            assert time.monotonic() - t0 < 30
        b_root = tmp_path / "b"
        b_root.mkdir()
        (b_root / "out.png").write_bytes(src.read_bytes())
        res = run_cli("batch", b_root, "-o", out.parent, *ARGS, "--weights", tiny_weights, "--json")
        assert res.returncode == 1
        item = json.loads(res.stdout)["items"][0]
        assert item["status"] == "failed" and "another infdit is writing" in item["reason"]
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert out.read_bytes() == ref  # the first run's output: as a lone run's
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.png"]


# -- 7b. the lock file's path (issue 30 item 6) --------------------------------------------------------------

def _lock(out: Path) -> Path:
    return out.with_name(f".{out.name}.infdit-lock")


@pytest.mark.parametrize("what", ["file", "hardlink", "stale", "stale-legacy", "empty"])
def test_the_lock_path_takes_only_an_earlier_infdit_lock(job, tmp_path, tiny_weights, monkeypatch, capsys,
                                                         what):
    """A user's file at the lock path (any content, or a hard link to another file, even one whose content
    looks like a lock) is refused in one line naming it, byte-identical afterwards; an earlier infdit's lock
    that no process holds (this version's form, or the bare pid of earlier ones) is taken and removed."""
    from infdit_cli.jobs.checkpoint import LOCK_TEXT

    src, ref = job[:2]
    out = tmp_path / "out.png"
    lock = _lock(out)
    keep = tmp_path / "keep.txt"
    if what == "file":
        lock.write_bytes(b"my notes\n")
    elif what == "hardlink":
        keep.write_bytes(b"4242\n")  # a lock's content, but another file's too
        os.link(keep, lock)
    elif what == "empty":
        lock.write_bytes(b"")
    else:
        lock.write_text(LOCK_TEXT.format(pid=999999) if what == "stale" else "999999\n")
    before = lock.read_bytes()
    res = _rerun_here(monkeypatch, capsys, src, out, tiny_weights)
    if what.startswith("stale"):
        assert res.returncode == 0, res.stderr
        assert out.read_bytes() == ref and not os.path.lexists(lock)
        return
    assert res.returncode == 1, res.stderr
    if what == "empty":  # another run's lock between its O_EXCL create and its flock: busy, never taken
        assert _one_line(res.stderr) == (f"error: another infdit is starting to write {out} (its lock file "
                                         f"{lock} is still empty; if no infdit runs, remove it)")
        assert lock.read_bytes() == b"" and not out.exists()
        return
    line = _one_line(res.stderr)
    assert line.startswith(f"error: lock file {lock} is not infdit's (")
    assert line.endswith("move it away, or remove it")
    assert ("2 links" in line) if what == "hardlink" else ("content is not an infdit lock" in line)
    assert lock.read_bytes() == before and not out.exists()
    if what == "hardlink":
        assert keep.read_bytes() == before and os.stat(keep).st_nlink == 2


def test_a_lock_file_replaced_during_the_run_is_left_alone(job, tmp_path, tiny_weights, monkeypatch, capsys):
    """A file put at the lock path during the run (after ours was removed) is not ours: kept at the end."""
    from infdit_cli.jobs.upscaler import Upscaler

    src, ref = job[:2]
    out = tmp_path / "out.png"
    lock = _lock(out)
    real = Upscaler.upscale_file

    def swap_then_run(self, *a, **k):
        assert lock.exists()
        lock.unlink()
        lock.write_bytes(b"the user's own file\n")
        return real(self, *a, **k)

    monkeypatch.setattr(Upscaler, "upscale_file", swap_then_run)
    res = _rerun_here(monkeypatch, capsys, src, out, tiny_weights)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == ref and lock.read_bytes() == b"the user's own file\n"


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs filled up but for `room` bytes (root, a kernel that allows it; else skipped: the lock
    part has a patched stand-in below)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
            capture_output=True).returncode == 0):
        yield None
        return

    def fill(room: int) -> Path:
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        os.truncate(filler, max(0, filler.stat().st_size - room))
        return filler

    try:
        yield fill
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("room", [0, 8192], ids=["at-the-lock", "at-the-output"])
def test_a_full_disk_names_the_folder_and_leaves_nothing_new(job, tmp_path, tiny_weights, monkeypatch, capsys,
                                                            full_disk, room):
    """No space for the lock file, or room for the lock but not the output: one line naming the folder, and
    the folder as it was (no 0-byte lock, no temporary file)."""
    src = job[0]
    disk = tmp_path / "disk"
    out = disk / "out.png"
    if full_disk is None:
        if room:
            pytest.skip("needs a tmpfs (root)")
        import errno

        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwrite", full)  # the lock's content is written with pwrite
    else:
        full_disk(room)
    before = sorted(p.name for p in disk.iterdir())
    res = _rerun_here(monkeypatch, capsys, src, out, tiny_weights, "--no-checkpoint")
    assert res.returncode == 1, res.stderr
    what = out.name if room else f"the lock file {_lock(out).name}"
    assert _one_line(res.stderr) == f"error: no space left in {disk} for {what}"
    assert sorted(p.name for p in disk.iterdir()) == before


# -- non-finite results ------------------------------------------------------------------------------------

def test_nan_weights_give_one_line_and_no_output(job, tmp_path, tiny_model):
    from infdit_cli.weights.format import save_model_file

    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    k = next(k for k, v in sd.items() if v.is_floating_point() and "final" in k or "out" in k)
    sd[k].fill_(float("nan"))
    w = tmp_path / "nan.safetensors"
    save_model_file(w, sd, tiny_model.config)
    for extra in (("--no-checkpoint",), ("--checkpoint",)):
        out = tmp_path / "out.png"
        res = run_cli("upscale", job[0], "-o", out, *ARGS, "--weights", w, *extra)
        assert res.returncode == 1, res.stderr
        assert "holds NaN or Inf" in _one_line(res.stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]


def test_a_nan_step_keeps_the_last_good_checkpoint(tmp_path, tiny_model):
    """In process: the denoiser turns to NaN at pass 1's third step; the step-2 checkpoint stays."""
    from infdit_cli.errors import NonFinite
    from infdit_cli.events import StepDone
    from infdit_cli.jobs.pipeline import UpscaleOptions
    from infdit_cli.jobs.upscaler import Upscaler

    src = tmp_path / "in.png"
    Image.fromarray(rgb_image(12, 14)).save(src)
    from infdit_cli.engine.blocks import BlockEngine

    done = []

    class Poisoned(BlockEngine):  # the denoiser's output turns to NaN from the third step on
        def __call__(self, x, sigma, out=None):
            y = super().__call__(x, sigma, out=out)
            return y.fill_(float("nan")) if len(done) >= 2 else y

    def on_event(e):
        if isinstance(e, StepDone):
            done.append(e)

    up = Upscaler(tiny_model, options=UpscaleOptions(steps=STEPS))
    up.engine = Poisoned
    with pytest.raises(NonFinite, match="after pass 1 step 3"):
        up.upscale_file(src, tmp_path / "out.png", scale=8, checkpoint=True, on_event=on_event)
    folder = run_folder_for(tmp_path / "out.png")
    assert _saved(folder) == (1, 2) and not (tmp_path / "out.png").exists()
    m = json.loads((folder / "meta.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == [".infdit", "meta.json", m["x"]["file"]]


# -- 8. the signal tests from a background job -------------------------------------------------------------

def test_signal_tests_pass_from_a_background_job_with_sigint_ignored():
    """A non-interactive shell starts `cmd &` with SIGINT ignored, and children inherit it: the tests that
    send SIGINT must still reach a child that handles it. From such a background job, a child started the
    way those tests start theirs (`preexec_fn=default_signals`) has Python's own SIGINT handler, and one
    started without it ignores SIGINT; and every test that sends SIGINT starts its process that way."""
    here = Path(__file__).parent
    probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    driver = ("import subprocess, sys\n"
              "from conftest import default_signals\n"
              f"probe = [sys.executable, '-c', {probe!r}]\n"
              "print(subprocess.run(probe, capture_output=True, text=True).stdout.strip())\n"
              "print(subprocess.run(probe, capture_output=True, text=True, preexec_fn=default_signals)"
              ".stdout.strip())\n")
    res = subprocess.run(["bash", "-c", f"{sys.executable} -c {shlex.quote(driver)} & wait $!"],
                         capture_output=True, text=True, cwd=here, timeout=120,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "True"]  # ignored as inherited; restored by default_signals
    for test in here.glob("test_*.py"):
        text = test.read_text()
        if "signal.SIGINT" in text:
            for call in _calls(text, "subprocess.Popen("):
                assert "preexec_fn=default_signals" in call, f"{test.name}: {call[:120]}"


def _calls(text: str, opening: str) -> list[str]:
    """The text of every call that starts with `opening`, up to its closing parenthesis."""
    calls, start = [], text.find(opening)
    while start >= 0:
        depth, i = 0, start + len(opening) - 1
        while True:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        if text[start - 1] not in "\"'":  # a call, not the name in a string
            calls.append(text[start:i + 1])
        start = text.find(opening, i)
    return calls
