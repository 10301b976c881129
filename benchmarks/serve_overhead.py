"""What a job costs through `infdit serve` against `infdit upscale`: the same image, options and weights.

A server job always checkpoints every step (so it survives a restart) and writes a preview JPEG after every
step; `infdit upscale` by default does neither for a short job. Rounds alternate, so both see the same
machine state:
- `upscale --no-checkpoint`: the job's own seconds (`--json`: `seconds`, model load excluded);
- `upscale --checkpoint --preview P`: the same with a checkpoint and a preview each step;
- `serve`: from the job's start to its end (`started` to `finished` in the job's JSON), one server for all
  rounds (the model is loaded once, as a server does).

    python benchmarks/serve_overhead.py [--config small] [--size 128] [--scale 4] [--steps 4] [--rounds 3]
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from PIL import Image


def post_job(url: str, path: Path, fields: dict) -> dict:
    boundary = uuid.uuid4().hex
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                    for k, v in fields.items())
    body += ((f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
              f'filename="{path.name}"\r\n\r\n').encode()
             + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode())
    req = urllib.request.Request(url + "api/jobs", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def wait_done(url: str, job_id: str) -> dict:
    while True:
        with urllib.request.urlopen(f"{url}api/jobs/{job_id}", timeout=60) as r:
            job = json.loads(r.read())
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        # a light poll (the page listens to the event stream instead); the times are the job's own
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from infdit_cli.model.config import PRESETS
    from infdit_cli.model.infdit import random_model
    from infdit_cli.weights.format import save_model_file

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFDIT_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "w.safetensors"
        model = random_model(PRESETS[args.config], seed=0)
        save_model_file(weights, model.state_dict(), model.config)
        del model
        src = tmp / "in.png"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)).save(src)
        common = ["--scale", str(args.scale), "--steps", str(args.steps), "--device", "cpu", "--weights",
                  str(weights)]
        err = open(tmp / "serve.err", "w")
        server = subprocess.Popen([sys.executable, "-m", "infdit_cli", "serve", "--port", "0", "--jobs",
                                   str(tmp / "jobs"), "--weights", str(weights), "--device", "cpu"],
                                  env=env, stderr=err, stdout=subprocess.DEVNULL)
        try:
            url = None
            while url is None:
                if server.poll() is not None:
                    raise SystemExit((tmp / "serve.err").read_text())
                m = re.search(r"infdit serve: (http://\S+?/)\s", (tmp / "serve.err").read_text())
                url = m.group(1) if m else None
                time.sleep(0.2)
            times: dict[str, list[float]] = {"upscale --no-checkpoint": [],
                                             "upscale --checkpoint --preview": [], "serve job": []}
            for r in range(args.rounds):
                for mode in times:
                    out = tmp / f"out{r}.png"
                    if mode == "serve job":
                        job = post_job(url, src, {"scale": args.scale, "steps": args.steps})
                        job = wait_done(url, job["id"])
                        assert job["state"] == "done", job
                        times[mode].append(job["finished"] - job["started"])
                        continue
                    extra = ["--no-checkpoint"] if mode.endswith("no-checkpoint") else [
                        "--checkpoint", "--preview", str(tmp / "preview.jpg")]
                    res = subprocess.run([sys.executable, "-m", "infdit_cli", "upscale", str(src), "-o",
                                          str(out), *common, *extra, "--json", "-q", "--overwrite"], env=env,
                                         capture_output=True, text=True, check=True)
                    times[mode].append(json.loads(res.stdout)["seconds"])
        finally:
            server.terminate()
            server.wait(60)
    base = statistics.median(times["upscale --no-checkpoint"])
    side = args.size * args.scale
    print(f"config `{args.config}`, {args.size}² -> {side}², {args.steps} steps, cpu float32, median of "
          f"{args.rounds} alternating rounds\n")
    print("| mode | seconds (median) | all rounds | / upscale --no-checkpoint |")
    print("|---|---|---|---|")
    for mode, ts in times.items():
        med = statistics.median(ts)
        print(f"| {mode} | {med:.2f} | {', '.join(f'{t:.2f}' for t in ts)} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
