"""Ranks that agree (issue 24): one plan for all ranks, out of memory stepped down together, a dead rank
fails the others in bounded time, and the job's exit code through `infdit_cli.launch`. gloo on the CPU,
2-3 processes, each run under a hard timeout."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infdit_cli.distributed.world import (
    ExitRecord,
    another_rank_failed,
    read_exit_codes,
    timeout_seconds,
    write_exit_code,
)
from infdit_cli.errors import BadRequest
from infdit_cli.launch import job_code, unreported
from infdit_cli.plan.planner import Placement, leanest, plan

HERE = Path(__file__).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def torchrun_worker(mode: str, out: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(HERE / "ranks_worker.py"), mode, str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)


# --- pure pieces -------------------------------------------------------------------------------------------

def test_leanest_takes_the_leanest_of_each_decision():
    from infdit_cli.model.config import PRESETS

    cfg = PRESETS["tiny"]
    a = plan(cfg, (96, 400), n=4, host_budget=8 << 30)
    b = plan(cfg, (96, 400), n=2, host_budget=8 << 30)
    assert leanest([a, a]) is a  # nothing to merge
    m = leanest([a, b, a])
    assert m.placement == b.placement and "leanest of 3" in m.reason
    host = type(a)(**{**a.__dict__, "placement": Placement(8, "col", True, False),
                      "state_dtype": torch.bfloat16, "low_memory": True})
    m = leanest([b, host])
    assert (m.n, m.cache_on_host, m.state_on_host, m.state_dtype, m.low_memory) == (2, True, False,
                                                                                    torch.bfloat16,
                                                                                     True)
    assert leanest([host, b]) == m  # the order of the ranks does not matter


def test_leave_runs_what_an_exit_runs_then_ends_without_finalising():
    """`leave`: non-daemon threads joined, atexit handlers run, output flushed, the code given; and no
    finalisation (an object's __del__ that the interpreter would run at shutdown does not run)."""
    code = ("import atexit, sys, threading, time\n"
            "from infdit_cli.distributed.world import leave\n"
            "class Noisy:\n"
            "    def __del__(self): print('finalised', flush=True)\n"
            "keep = Noisy()\n"
            "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done'))).start()\n"
            "atexit.register(print, 'atexit ran')\n"
            "sys.stdout.write('unflushed ')\n"
            "leave(3)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, res.stderr
    assert res.stdout.split() == ["unflushed", "thread", "done", "atexit", "ran"]  # no "finalised"


def rec(code: int, after: bool = False, said: bool = False) -> ExitRecord:
    return ExitRecord(code, after, said)


def test_job_code_prefers_rank_0_then_the_first_failing_rank():
    assert job_code({0: rec(0), 1: rec(0)}, False) == 0
    assert job_code({0: rec(3, said=True), 1: rec(3)}, True) == 3
    assert job_code({0: rec(2, said=True), 1: rec(0)}, True) == 2
    assert job_code({0: rec(0), 1: rec(1), 2: rec(3)}, True) == 1
    assert job_code({0: rec(1)}, True) == 1  # rank 1 killed: wrote nothing
    assert job_code({}, True) == 1 and job_code({}, False) == 0
    assert job_code({0: rec(1), 1: rec(1)}, True, signum=2) == 130
    assert job_code({}, True, signum=15) == 143


def test_job_code_is_the_cause_not_what_followed_it():
    # rank 2 ran out of memory on its own; rank 0 lost contact, rank 1 was stopped by torchrun after it
    assert job_code({0: rec(1, after=True), 1: rec(143, after=True), 2: rec(3, said=True)}, True) == 3
    assert job_code({0: rec(143, after=True), 1: rec(2, said=True)}, True) == 2
    assert job_code({0: rec(1, after=True)}, True) == 1  # only followers recorded: still a failure


def test_the_launcher_speaks_only_where_no_rank_did():
    # The launcher's signal: rank 0 said it, so the launcher adds nothing; no rank said it: one line.
    assert unreported({0: rec(143, said=True), 1: rec(143)}, {}, 15) is None
    assert unreported({1: rec(143)}, {}, 15) == "terminated by SIGTERM"  # rank 0 killed while it was starting
    assert unreported({}, {}, 2) == "interrupted"
    assert unreported({}, {}, 1) == "terminated by SIGHUP"
    # A rank killed outright (the OOM killer): always named (no rank could know it), with or without a line.
    assert unreported({0: rec(0)}, {1: 9}, None).startswith("rank 1 was killed by SIGKILL")
    assert unreported({0: rec(1, said=True)}, {1: 9}, None).startswith("rank 1 was killed by SIGKILL")
    assert unreported({0: rec(0), 1: rec(0)}, {}, None) is None
    # One rank stopped by a signal sent to it alone (it stays silent: stops are rank 0's to say).
    assert unreported({0: rec(1, after=True), 1: rec(143)}, {}, None) == "rank 1 was terminated by SIGTERM"
    assert unreported({0: rec(1, after=True), 1: rec(1, said=True)}, {}, None) is None


def test_exit_records_round_trip(tmp_path):
    base = str(tmp_path / "exit")
    for rank, (code, after, said) in enumerate([(0, False, False), (1, True, False), (143, False, True)]):
        write_exit_code(code, after=after, said=said, env={"INFDIT_EXIT_FILE": base, "RANK": str(rank)})
    (tmp_path / "exit.7").write_text("not a code\n")  # damaged: left out
    (tmp_path / "exit.3.tmp").write_text("1 own said\n")  # being written: left out
    assert read_exit_codes(base) == {0: rec(0), 1: rec(1, after=True), 2: rec(143, said=True)}
    env = {"INFDIT_EXIT_FILE": base, "RANK": "0"}
    assert another_rank_failed(stops=True, env=env)  # rank 2's own 143
    assert not another_rank_failed(stops=False, env=env)  # a stop is not a failure; rank 1 only followed
    assert not another_rank_failed(stops=True, env={"RANK": "0"})  # not under the launcher


def test_rank_timeout_from_the_environment():
    assert timeout_seconds({}) == 600.0
    assert timeout_seconds({"INFDIT_RANK_TIMEOUT": "7.5"}) == 7.5
    for bad in ("0", "-3", "nan", "inf", "soon"):
        with pytest.raises(BadRequest, match="INFDIT_RANK_TIMEOUT"):
            timeout_seconds({"INFDIT_RANK_TIMEOUT": bad})


# --- several ranks -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_out_of_memory_on_rank_1_steps_every_rank_down(tmp_path):
    """Rank 1 alone runs out of memory mid-call: every rank steps down and redoes the call with it (a rank
    redoing it alone would leave the others waiting in a collective)."""
    out = tmp_path / "r.json"
    res = torchrun_worker("stepdown", out)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["every_rank_changes"] == [["n=2 -> n=1"], ["n=2 -> n=1"]]  # the same plan after, on every rank
    assert r["notices"] == ["out of device memory on rank 1: every rank steps down"]
    assert r["max_abs"] <= 1e-5 and r["pixels_equal"]  # against one process without any fault


@pytest.mark.slow
def test_out_of_memory_between_two_layers_on_two_ranks(tmp_path):
    """Out of memory with messages in flight: a sender with a layer of its edge not yet sent, a receiver
    with its left column's receives posted and one still landing. Both owe the rest of the call, every
    rank steps down, and the image is the one-process image."""
    out = tmp_path / "r.json"
    res = torchrun_worker("midlayer", out, nproc=3)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["every_rank_changes"] == [["n=2 -> n=1"]] * 3
    assert r["notices"] == ["out of device memory on ranks 0, 1: every rank steps down"]
    assert r["max_abs"] <= 1e-5 and r["pixels_equal"]


@pytest.mark.slow
def test_ranks_with_different_budgets_agree_on_one_plan(tmp_path):
    out = tmp_path / "r.json"
    res = torchrun_worker("budget", out, nproc=3)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    own = [e["own"] for e in r["every_rank"]]
    assert own[0] != own[1] == own[2]  # rank 0 alone would take a larger n
    assert {e["agreed"] for e in r["every_rank"]} == {own[1]}  # all take the leanest
    assert "leanest of 3" in r["reason"] and r["max_abs"] <= 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(mode: str, tmp_path: Path, limit: float) -> list[subprocess.Popen]:
    """ranks_worker.py MODE on 2 ranks without torchrun (whose agent would stop the others itself)."""
    port, procs = _free_port(), []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "INFDIT_RANK_TIMEOUT": str(limit)}
        procs.append(subprocess.Popen([sys.executable, str(HERE / "ranks_worker.py"), mode,
                                       str(tmp_path / "r")],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_a_killed_rank_fails_the_others_at_once(tmp_path):
    """Rank 1 SIGKILLs itself mid-call: rank 0 exits non-zero well within INFDIT_RANK_TIMEOUT (gloo sees the
    connection close), never waits for ever."""
    limit = 20
    procs = _two_ranks("kill", tmp_path, limit)
    try:
        assert procs[1].wait(timeout=60) == -9  # it did die mid-call
        died = time.monotonic()
        assert procs[0].wait(timeout=limit + 30) != 0
        assert time.monotonic() - died <= limit
    finally:
        _stop(procs)


@pytest.mark.slow
def test_a_hung_rank_fails_the_others_after_the_timeout(tmp_path):
    """Rank 1 stops (SIGSTOP) mid-call, its sockets open: rank 0 exits non-zero once INFDIT_RANK_TIMEOUT
    has passed, and not before."""
    limit = 5
    procs = _two_ranks("stop", tmp_path, limit)
    try:
        stat = Path(f"/proc/{procs[1].pid}/stat")
        end = time.monotonic() + 60
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
            assert time.monotonic() < end and procs[0].poll() is None
            time.sleep(0.02)
        stopped = time.monotonic()
        assert procs[0].wait(timeout=limit + 30) != 0
        assert limit - 1 <= time.monotonic() - stopped <= limit + 5
    finally:
        _stop(procs)


# --- exit codes through the launcher -----------------------------------------------------------------------

def launcher(*args: str, entry: str | None = None, fault: str | None = None, cwd=None, env=None
             ) -> subprocess.CompletedProcess:
    """`python -m infdit_cli.launch --standalone --nproc-per-node 2 -- ARGS` (or with a test script as the
    ranks' program, `fault` its first argument); prints each rank's exit code as JSON on stdout first."""
    code = ("import json, sys; from infdit_cli import launch as L\n"
            "from infdit_cli.distributed import world as D\n"
            "read = D.read_exit_codes\n"
            "def spy(base):\n"
            "    c = read(base); print(json.dumps({r: e.code for r, e in c.items()}), flush=True)"
            "; return c\n"
            "D.read_exit_codes = spy\n"
            "entry = ['-m', 'infdit_cli'] if sys.argv[1] == '-' else [sys.argv[1]]\n"
            "sys.exit(L.launch(['--standalone', '--nproc-per-node=2'], sys.argv[2:], entry=entry))")
    return subprocess.run([sys.executable, "-c", code, entry or "-", *([fault] if fault else []), *args],
                          capture_output=True, text=True, env={**ENV, **(env or {})}, cwd=cwd, timeout=120)


def test_launcher_usage_error_is_2_with_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "infdit_cli.launch", "--standalone", "--nproc-per-node=2",
                          "--",
                          "upscale", "in.png", "--scale", "0.5"], capture_output=True, text=True, env=ENV,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr
    # rank 0's line, nothing else
    assert res.stderr.strip() == "error: --scale must be greater than 1, got 0.5"
    res = subprocess.run([sys.executable, "-m", "infdit_cli.launch", "upscale", "in.png"],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("error: give torchrun's options, then --")


@pytest.mark.slow
def test_out_of_memory_at_the_leanest_plan_is_3_on_every_rank(tmp_path, tiny_weights):
    src = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 100, 3), dtype=np.uint8)).save(src)
    res = launcher("upscale", str(src), "-o", str(tmp_path / "out.png"), "--scale", "4", "--steps", "2",
                   "--device", "cpu", "--weights", str(tiny_weights), "--block-batch", "2",
                   entry=str(HERE / "fault_cli.py"), fault="oom", cwd=tmp_path)
    assert res.returncode == 3, res.stderr[-2000:]
    assert json.loads(res.stdout.splitlines()[0]) == {"0": 3, "1": 3}  # every rank exits 3
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "out of device memory" in errors[0], res.stderr[-2000:]  # one line, rank 0's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.png"]  # no partial output


def _long_job(tmp_path: Path, tiny_weights: Path) -> subprocess.Popen:
    """An `upscale` through the launcher on 2 ranks that samples for far longer than a test waits."""
    src = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 200, 3), dtype=np.uint8)).save(src)
    cmd = [sys.executable, "-m", "infdit_cli.launch", "--standalone", "--nproc-per-node=2", "--", "upscale",
           str(src), "-o", str(tmp_path / "out.png"), "--scale", "4", "--steps", "50", "--device", "cpu",
           "--weights", str(tiny_weights), "--block-batch", "2", "-q", "--no-checkpoint"]
    return subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _signal_after(p: subprocess.Popen, after: float, send) -> tuple[str, float]:
    """`send()` (a signal) `after` seconds into the job `p`: (its stderr, seconds from the signal to its
    end)."""
    try:
        time.sleep(after)
        assert p.poll() is None
        send()
        sent = time.monotonic()
        _, err = p.communicate(timeout=60)
        return err, time.monotonic() - sent
    finally:
        _stop([p])


@pytest.mark.slow
@pytest.mark.parametrize("after", [8.0, 1.5], ids=["sampling", "starting"])
def test_launcher_sigterm_is_143_with_one_line(tmp_path, tiny_weights, after):
    p = _long_job(tmp_path, tiny_weights)
    # After 8 s the ranks are sampling (50 steps take far longer); after 1.5 s the launcher or the ranks
    # are still importing, before any handler of theirs (CI's slower machine met that at 8 s).
    err, took = _signal_after(p, after, p.terminate)
    assert p.returncode == 143, err[-2000:]
    # The ranks stop by themselves, in seconds. A rank waiting at a barrier for a peer that left mid-exchange
    # would be killed by torchrun 30 s after its SIGTERM (this failed in CI: the lock file was left behind).
    assert took < 20, (took, err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    # The rank's own line names SIGTERM; under load torchrun's agent has been seen to stop the ranks first
    # (1 run in 4 here), and then it reads "interrupted"; where no rank could speak, the launcher's line
    # names SIGTERM. Either way one line, and the launcher's code 143.
    assert lines in (["error: terminated by SIGTERM"], ["error: interrupted"]), err[-2000:]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["big.png"]  # no partial output


@pytest.mark.slow
def test_one_ranks_own_error_ends_the_job_at_once_with_its_line(tmp_path, tiny_weights):
    """Rank 1's disk fills mid-call while rank 0 waits on it: the job ends in seconds, not after
    INFDIT_RANK_TIMEOUT (rank 1 leaves the group without a barrier; rank 0 meets the closed connection,
    finds rank 1's record and stays silent), with rank 1's line and code."""
    src = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 100, 3), dtype=np.uint8)).save(src)
    start = time.monotonic()
    res = launcher("upscale", str(src), "-o", str(tmp_path / "out.png"), "--scale", "4", "--steps", "3",
                   "--device", "cpu", "--weights", str(tiny_weights), "--block-batch", "2", "-q",
                   entry=str(HERE / "fault_cli.py"), fault="disk", cwd=tmp_path,
                   env={"INFDIT_RANK_TIMEOUT": "300"})
    took = time.monotonic() - start
    assert res.returncode == 1, res.stderr[-2000:]
    codes = json.loads(res.stdout.splitlines()[0])
    # rank 0 meets the closed connection and exits 1 (after), or, when torchrun's agent sees rank 1's exit
    # first (seen once in CI), is stopped by its SIGTERM: 143, also recorded as after. Silent either way.
    assert codes["1"] == 1 and codes["0"] in (1, 143), codes
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == ["error: no space left on device: /scratch/injected"], res.stderr[-2000:]
    assert took < 60, took  # with a barrier on the way out: 300 s and more (INFDIT_RANK_TIMEOUT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.png"]  # no partial output, no lock file


def _child(parent: int, rank: int, wait: float = 30) -> int:
    """The pid of `parent`'s child process with RANK=`rank` in its environment."""
    end = time.monotonic() + wait
    while time.monotonic() < end:
        for d in Path("/proc").iterdir():
            try:
                if (d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent
                        and f"RANK={rank}".encode() in (d / "environ").read_bytes().split(b"\0")):
                    return int(d.name)
            except (OSError, ValueError, IndexError):
                pass
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} under pid {parent}")


@pytest.mark.slow
def test_sigterm_to_one_rank_alone_ends_the_job_with_one_line(tmp_path, tiny_weights):
    """`kill` of rank 1 alone, mid-sampling: 143 in seconds, one line (rank 1 stays silent, as ranks do for
    stops; rank 0 either finds rank 1's record and leaves the line to the launcher, or gets torchrun's
    SIGTERM first and says it), no partial output."""
    p = _long_job(tmp_path, tiny_weights)
    rank1 = _child(p.pid, 1)
    err, took = _signal_after(p, 8.0, lambda: os.kill(rank1, signal.SIGTERM))  # sampling by then
    assert p.returncode == 143, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines in (["error: rank 1 was terminated by SIGTERM"],
                     ["error: terminated by SIGTERM"]), err[-2000:]
    assert took < 20, took
    assert sorted(q.name for q in tmp_path.iterdir()) == ["big.png"]
