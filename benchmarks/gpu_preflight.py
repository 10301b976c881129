"""Five seconds before the GPU selftest: can everything it needs be imported, and what machine is this?

Prints one `name: value` line per fact (versions, the GPU and its free memory, host memory, cores, disk,
a 1 GiB pinned-memory probe on CUDA) and exits 1 naming every required package that failed to import, so
a missing package costs seconds, not the run (infdit needs nothing the GPU machine lacks: its CLIP tower is
its own; open_clip is a test dependency only). Runs on the standard library and torch alone; `infdit_cli`
is imported last, as the selftest will.
DEVICE=cpu (the rehearsal) skips the probe.
"""

import importlib
import os
import shutil
import sys
import time

t0 = time.perf_counter()
missing = []
for name in ("torch", "numpy", "safetensors", "PIL", "typer", "rich", "huggingface_hub", "infdit_cli"):
    try:
        mod = importlib.import_module(name)
        print(f"{name}: {getattr(mod, '__version__', 'ok')}")
    except Exception as e:  # noqa: BLE001 - every failure is a line of the report
        missing.append(name)
        print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

print(f"python: {sys.version.split()[0]}")
print(f"cpu cores: {os.cpu_count()}")
try:
    with open("/proc/meminfo") as f:
        mem = {k: v.strip() for k, v in (line.split(":", 1) for line in f)}
    print(f"host memory: MemTotal {mem.get('MemTotal')}, MemAvailable {mem.get('MemAvailable')}")
except OSError:
    pass
for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    if os.path.exists(path):
        print(f"cgroup memory limit: {open(path).read().strip()}")
print(f"disk free (tmp): {shutil.disk_usage(os.environ.get('TMPDIR', '/tmp')).free / 2**30:.1f} GiB")
print(f"PYTORCH_CUDA_ALLOC_CONF: {os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '(unset)')}")


def pinned_probe() -> str:
    """Register 1 GiB of host memory with CUDA and unregister it, through the engine's own path
    (`storage.Scratch(pin=True)`), then check that CUDA still launches kernels (a refusal must not leave
    an error behind that the next launch would report)."""
    import gc

    import torch

    from infdit_cli.engine.storage import Scratch

    t = time.perf_counter()
    scratch = Scratch(pin=True)
    buf = scratch.empty("probe", (1 << 30,), torch.uint8)
    pinned, reg = scratch.pin, time.perf_counter() - t
    if pinned:
        src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        buf.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        d2h = (1 << 30) / (time.perf_counter() - t) / 1e9
        del src
    t = time.perf_counter()
    del buf, scratch
    gc.collect()
    unreg = time.perf_counter() - t
    x = torch.ones(1024, device="cuda")
    ok = float((x * 2).sum()) == 2048.0  # raises if a refusal left a sticky error
    if not pinned:
        return f"REFUSED in {reg:.2f} s (host-cache rows run unpinned); CUDA still works: {ok}"
    return (f"1 GiB registered in {reg:.2f} s, device->host {d2h:.1f} GB/s, unregistered in {unreg:.2f} s; "
            f"CUDA still works: {ok}")


if "torch" not in missing:
    import torch

    print(f"cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        print(f"gpu: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}), "
              f"free {free / 2**30:.1f} / {total / 2**30:.1f} GiB, cuda {torch.version.cuda}, "
              f"bf16 {torch.cuda.is_bf16_supported()}")
    if os.environ.get("DEVICE", "cuda") == "cpu" or not torch.cuda.is_available():
        print("pinned probe: skipped (no CUDA here)")
    elif "infdit_cli" not in missing:
        try:
            print(f"pinned probe: {pinned_probe()}")
        except Exception as e:  # noqa: BLE001 - a line of the report, not the end of the run
            print(f"pinned probe: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
print(f"preflight: {time.perf_counter() - t0:.1f} s")
if missing:
    print(f"preflight FAILED: cannot import {', '.join(missing)}")
    sys.exit(1)
