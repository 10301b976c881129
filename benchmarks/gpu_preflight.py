"""Five seconds before the GPU selftest: can everything it needs be imported, and what machine is this?

Prints one `name: value` line per fact (versions, the GPU and its free memory, host memory, cores, disk)
and exits 1 naming every package that failed to import, so a missing wheel costs seconds, not the run.
Runs on the standard library and torch alone; `infdit_cli` is imported last, as the selftest will.
"""

import importlib
import os
import shutil
import sys
import time

t0 = time.perf_counter()
missing = []
# open_clip imports regex, ftfy, wcwidth (via ftfy), tqdm, torchvision and numpy at import time.
for name in ("torch", "numpy", "torchvision", "regex", "ftfy", "wcwidth", "tqdm", "timm", "open_clip",
             "safetensors", "PIL", "typer", "rich", "huggingface_hub", "infdit_cli"):
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
if "torch" not in missing:
    import torch

    print(f"cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        print(f"gpu: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}), "
              f"free {free / 2**30:.1f} / {total / 2**30:.1f} GiB, cuda {torch.version.cuda}, "
              f"bf16 {torch.cuda.is_bf16_supported()}")
print(f"preflight: {time.perf_counter() - t0:.1f} s")
if missing:
    print(f"preflight FAILED: cannot import {', '.join(missing)}")
    sys.exit(1)
