"""Running under `torchrun`: which rank this process is, its device, the process group, and sharding.

torchrun (and Slurm around it) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every
process it starts; nothing here launches processes. Without those variables everything is one process
(`World()`), and every function here is a no-op or the identity, so the one-process path never touches
torch.distributed.

The process group is gloo on the CPU; with CUDA it is "cpu:gloo,cuda:nccl", so small Python objects
(plans, reports) travel over gloo and device tensors (part 2's boundary keys/values) over NCCL.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace

import torch

from ..errors import BadRequest
from ..files import atomic_write
from ..plan.device import prefer_expandable_segments
from ..plan.planner import leanest
from ..settings import Settings, settings

__all__ = ["World", "world_from_env", "init", "group", "teardown", "rank_device", "broadcast",
           "gather", "agree_plan", "joined", "timeout_seconds", "TIMEOUT_DEFAULT",
           "ExitRecord", "STOP_CODES", "write_exit_code", "read_exit_codes", "another_rank_failed", "leave"]

TIMEOUT_DEFAULT = 600.0  # seconds a collective or a receive waits for the other ranks (NCCL's own default)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(env: dict[str, str] | None = None) -> World:
    """This process's place in the job, from torchrun's variables (one process when they are absent)."""
    s = settings() if env is None else Settings.read(env)
    if s.world_size is None or s.rank is None:
        return World()
    size, rank = int(s.world_size), int(s.rank)
    local = int(s.local_rank) if s.local_rank is not None else rank
    if not 0 <= rank < size:
        raise ValueError(f"RANK={rank} outside WORLD_SIZE={size}")
    return World(rank, size, local)


def rank_device(name: str, world: World) -> str:
    """The device this rank computes on: `auto`/`cuda` become `cuda:LOCAL_RANK` where CUDA exists, so
    each rank of a node gets its own GPU; an explicit `cuda:i` or `cpu` is kept."""
    if world.distributed and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{world.local_rank % torch.cuda.device_count()}"
    return name


def timeout_seconds(env: dict[str, str] | None = None) -> float:
    """How long a rank waits for the others in a collective or a receive: `INFDIT_RANK_TIMEOUT` seconds
    (default `TIMEOUT_DEFAULT`). A rank that died makes the others fail after at most this long (on gloo
    usually at once: the dead peer's sockets close)."""
    text = (settings() if env is None else Settings.read(env)).rank_timeout
    try:
        value = float(text) if text else TIMEOUT_DEFAULT
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise BadRequest(f"INFDIT_RANK_TIMEOUT must be a positive number of seconds, got {text[:20]!r}")
    return value


def init(world: World, device: str = "cpu") -> None:
    """Join the process group (once). gloo for objects and CPU tensors; NCCL too when on CUDA. Every wait
    on another rank ends after `timeout_seconds()` with an error, never a hang."""
    import datetime

    import torch.distributed as dist

    global _JOINED
    if not world.distributed or dist.is_initialized():
        return
    _JOINED = True
    timeout = datetime.timedelta(seconds=timeout_seconds())
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    if not cuda:
        dist.init_process_group("gloo", rank=world.rank, world_size=world.size, timeout=timeout)
        return
    dev = torch.device(rank_device(device, world))
    prefer_expandable_segments(dev)  # before CUDA initialises here
    torch.cuda.set_device(dev)
    # device_id: NCCL's communicator (and its buffers, hundreds of MiB) made now, not at the first exchange,
    # after the plan took the free memory (a DistBackendError then, no out-of-memory the ladder catches);
    # one tiny all_reduce makes sure of it where `device_id` alone connects lazily.
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=world.rank, world_size=world.size, timeout=timeout,
                            device_id=dev)
    warm = torch.zeros(1, device=dev)
    dist.all_reduce(warm)
    torch.cuda.synchronize(dev)


_JOINED = False


def joined() -> bool:
    """Whether this process ever joined a process group (before that, every rank has met the same command
    line and files: what fails then fails alike on all)."""
    return _JOINED


def agree_plan(world: World):
    """For `Upscaler.agree`: every rank's plan of each pass merged into the leanest (`planner.leanest`),
    the same on every rank. Ranks plan from their own free device memory; sender and receiver must hold
    the same n and keep their caches (and state) on the same side, or their messages would not pair."""
    def agree(up_plan):
        if not world.distributed:
            return up_plan
        import torch.distributed as dist

        every = [None] * world.size
        dist.all_gather_object(every, [p.memory for p in up_plan.passes])
        if any(len(plans) != len(up_plan.passes) for plans in every):  # same input and options: never
            raise RuntimeError("the ranks planned different numbers of passes")
        passes = [replace(p, memory=leanest([plans[i] for plans in every]))
                  for i, p in enumerate(up_plan.passes)]
        return replace(up_plan, passes=passes)

    return agree


STOP_CODES = frozenset({129, 130, 143})  # SIGHUP, SIGINT, SIGTERM: a stop, not a failure of the rank's own


@dataclass(frozen=True)
class ExitRecord:
    """What a rank leaves for the launcher in `$INFDIT_EXIT_FILE.RANK`: its exit code; `after`: it failed
    because another rank did first (lost contact with it, or stopped by torchrun once it had failed);
    `said`: it printed the job's error line."""

    code: int
    after: bool = False
    said: bool = False


def write_exit_code(code: int, *, after: bool = False, said: bool = False, env: dict[str, str] | None = None
                    ) -> None:
    """Under `infdit_cli.launch`: this rank's `ExitRecord` into `$INFDIT_EXIT_FILE.RANK`, where the launcher
    reads it after torchrun ends (torchrun itself only says 0 or 1). Nothing otherwise; never raises."""
    s = settings() if env is None else Settings.read(env)
    if not s.exit_file:
        return
    final = f"{s.exit_file}.{s.rank if s.rank is not None else '0'}"
    try:  # whole or absent: another rank may be reading it now (`another_rank_failed`)
        atomic_write(final, f"{int(code)} {'after' if after else 'own'} {'said' if said else 'silent'}\n")
    except OSError:
        pass


def read_exit_codes(base: str) -> dict[int, ExitRecord]:
    """Every rank's `ExitRecord` written so far under `base` (`$INFDIT_EXIT_FILE`), by rank."""
    out = {}
    folder, stem = os.path.split(base)
    try:
        names = os.listdir(folder)
    except OSError:
        return out
    for name in names:
        rank = name.removeprefix(stem + ".")
        if not (name.startswith(stem + ".") and rank.isdigit()):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                words = f.read(100).split()
            out[int(rank)] = ExitRecord(int(words[0]), "after" in words[1:], "said" in words[1:])
        except (OSError, ValueError, IndexError):
            pass
    return out


def another_rank_failed(*, stops: bool, wait: float = 0.0, env: dict[str, str] | None = None) -> bool:
    """Under `infdit_cli.launch`: whether another rank has recorded a failure of its own (non-zero, not
    `after` one; a stop by a signal counts where `stops`), looking for up to `wait` seconds (a peer that
    failed first may still be reporting when this rank meets the closed connection)."""
    s = settings() if env is None else Settings.read(env)
    base, me = s.exit_file, s.rank if s.rank is not None else "0"
    if not base:
        return False
    end = time.monotonic() + wait
    while True:
        for rank, rec in read_exit_codes(base).items():
            if str(rank) != me and rec.code and not rec.after and (stops or rec.code not in STOP_CODES):
                return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)


@contextlib.contextmanager
def group(world: World, device: str = "cpu"):
    """The process group around a `with` block: `init` on entry, `teardown` on leaving, clean only where the
    block ended normally. A no-op for one process."""
    init(world, device)
    try:
        yield
    except BaseException:
        teardown(clean=False)
        raise
    teardown(clean=True)


def _cpu_barrier(dist) -> None:
    """The group's barrier on its CPU backend (gloo), also on the "cpu:gloo,cuda:nccl" group, where
    `dist.barrier()` goes through NCCL on the bound device (`device_id`; a dead peer then costs the NCCL
    watchdog's timeout). Gloo's barrier first waits for this rank's work in flight (a CPU all_reduce would
    not: a send still pending when the group is destroyed aborts the process)."""
    try:
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    except (AttributeError, RuntimeError):  # a torch without per-device backends: the group is gloo's only
        dist.barrier()
        return
    backend.barrier().wait()


def teardown(clean: bool = True) -> None:
    """Leave the process group. `clean` (this rank's work ended normally): every rank reaches the end before
    any leaves (gloo fails a peer still receiving from one gone early), at the CPU backend's barrier.
    Otherwise at once: after an error or a signal this rank may be mid-exchange, and a barrier could pair with
    a peer's unfinished receive and hold both until torchrun kills them or INFDIT_RANK_TIMEOUT passes; the
    peers meet the closed connections and fail at once."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        try:
            _cpu_barrier(dist)
        except (RuntimeError, ValueError):  # a peer already failed: its error is the one to report
            pass
        dist.destroy_process_group()
        return
    try:  # abort: no waiting for work in flight (destroy's shutdown may wait on it)
        dist.distributed_c10d._abort_process_group()
    except Exception:  # noqa: BLE001 - a backend without abort: leave as cleanly as it can
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving anyway; the error that brought us here is the one to report
            pass


def leave(code: int):
    """End a process that joined a process group: what a normal exit runs first (non-daemon threads joined,
    atexit handlers: temporary files, logging; output flushed), then `os._exit(code)`, without the
    interpreter's finalisation. c10d's gloo workers outlive `destroy_process_group`, and one that drops a
    finished collective's tensors while the interpreter finalises needs the GIL and aborts the process
    ("terminate called without an active exception", pytorch/pytorch#179291): a job that succeeded would
    end as a crashed rank (seen about 1 run in 10 of a 3-rank job on a loaded 2-core machine)."""
    import atexit
    import sys
    import threading

    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it anyway
            pass
    os._exit(code)


def broadcast(obj, world: World):
    """Rank 0's `obj` on every rank (a picklable object)."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, world: World) -> list | None:
    """Every rank's `obj` on rank 0, in rank order (None on the other ranks)."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * world.size if world.main else None
    dist.gather_object(obj, out, dst=0)
    return out
