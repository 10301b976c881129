"""The demo model's quality on held-out photos it never saw: PSNR against the original, beside bicubic.

For each photo: crop to a multiple of 4, downscale 4x with Pillow's bicubic (the LR), upscale the LR with the
real command `infdit upscale LR --weights demo --scale 4 --seed S`, and compare with the original
(PSNR on 8-bit RGB over the whole image), next to Pillow's bicubic 4x of the same LR. Writes a side-by-side
crop picture (LR nearest-upscaled, bicubic, demo, original) and prints a Markdown table.

    python benchmarks/demo_quality.py HELDOUT_DIR [--weights demo] [--seed 0] [--picture docs/demo.png]

The held-out photos of docs/demo.md are scikit-image's chelsea.png and coffee.png (never in training or
validation). Not a timed test.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SCALE = 4
PANEL = 160  # side of one crop in the picture, original pixels


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def run_upscale(lr_path: Path, out: Path, weights: str, seed: int, extra: list[str]) -> list[str]:
    cmd = ["infdit", "upscale", str(lr_path), "--weights", weights, "--scale", str(SCALE), "--seed",
           str(seed), "-o", str(out), "--quiet", *extra]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return cmd


def panel_row(images: list[Image.Image], box: tuple[int, int, int, int], labels: list[str]) -> Image.Image:
    pad, text_h = 4, 14
    row = Image.new("RGB", (len(images) * (PANEL + pad) - pad, PANEL + text_h), "white")
    draw = ImageDraw.Draw(row)
    for i, (im, label) in enumerate(zip(images, labels)):
        row.paste(im.crop(box), (i * (PANEL + pad), text_h))
        draw.text((i * (PANEL + pad) + 2, 1), label, fill="black")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("heldout", type=Path)
    ap.add_argument("--weights", default="demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--picture", type=Path, default=Path("docs/demo.png"))
    ap.add_argument("--upscale-args", default="", help="extra options for infdit upscale, one string")
    a = ap.parse_args()

    files = sorted(p for p in a.heldout.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    rows, table = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            hr = Image.open(f).convert("RGB")
            w, h = hr.width // SCALE * SCALE, hr.height // SCALE * SCALE
            hr = hr.crop((0, 0, w, h))
            lr = hr.resize((w // SCALE, h // SCALE), Image.BICUBIC)
            lr_path, out = Path(tmp) / f"{f.stem}.lr.png", Path(tmp) / f"{f.stem}.demo.png"
            lr.save(lr_path)
            cmd = run_upscale(lr_path, out, a.weights, a.seed, a.upscale_args.split())
            demo = Image.open(out).convert("RGB")
            if demo.size != hr.size:
                sys.exit(f"{out}: {demo.size} is not the original's {hr.size}")
            bicubic = lr.resize((w, h), Image.BICUBIC)
            nearest = lr.resize((w, h), Image.NEAREST)
            ref = np.asarray(hr)
            p_demo, p_bic = psnr(np.asarray(demo), ref), psnr(np.asarray(bicubic), ref)
            table.append((f.name, f"{w}x{h}", p_bic, p_demo))
            cx, cy = (w - PANEL) // 2, (h - PANEL) // 2
            rows.append(panel_row([nearest, bicubic, demo, hr], (cx, cy, cx + PANEL, cy + PANEL),
                                  [f"{f.stem}: LR (nearest)", f"bicubic {p_bic:.2f} dB",
                                   f"demo {p_demo:.2f} dB", "original"]))
    pic = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 4 for r in rows) - 4), "white")
    y = 0
    for r in rows:
        pic.paste(r, (0, y))
        y += r.height + 4
    a.picture.parent.mkdir(parents=True, exist_ok=True)
    pic.save(a.picture)
    print("command per image: infdit upscale LR.png " + " ".join(cmd[3:9]) + " -o OUT.png")
    print("| image | size | PSNR bicubic (dB) | PSNR demo (dB) | demo - bicubic (dB) |")
    print("|---|---|---|---|---|")
    for name, size, pb, pd in table:
        print(f"| {name} | {size} | {pb:.2f} | {pd:.2f} | {pd - pb:+.2f} |")
    print(f"wrote {a.picture}")


if __name__ == "__main__":
    main()
