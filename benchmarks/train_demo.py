"""Does `infdit train` learn? Validation loss of a short run beside the "answer lr_up" baseline denoiser.

Trains a preset (default `tiny`) from scratch for a fixed number of steps with the training loop
`infdit train` runs, and prints at every validation the loss on the loop's fixed validation crops, sigmas and
noise next to the loss of the baseline D(x + sigma n, sigma) = lr_up (the bicubic 4x of the LR) on the very
same inputs, computed with `recipe.edm_loss`; at the end, the loss at each validation sigma of the trained
model and of three denoisers that learned nothing (`baselines`), the strongest of them a sigma-wise blend of
the noisy input and lr_up: the EDM-weighted loss of lr_up alone is large at small sigma, where the noisy input
is better.

    python benchmarks/train_demo.py PHOTOS --val VAL [--config tiny] [--steps 300] [--crop 64] [--every 50]
    python benchmarks/train_demo.py PHOTOS --val VAL --config demo --crop 128 --baseline-only --weights FILE

The demo photos come from scikit-image's wheel (docs/demo.md): `pip download --no-deps scikit-image==0.26.0`,
unzip `skimage/data/`. Not a timed test: the figures are in docs/demo.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from infdit_cli.events import TrainValidated
from infdit_cli.model.config import PRESETS
from infdit_cli.train import recipe as R
from infdit_cli.train.data import ValSet, scan
from infdit_cli.train.loop import TrainConfig, _held_out, train, val_sigmas


def val_batches(cfg: TrainConfig, crop: int) -> list[dict]:
    """The loop's validation inputs: per image, its fixed crop repeated at each fixed sigma."""
    scale = PRESETS[cfg.config].sr_scale
    if cfg.val is not None:
        items = scan(cfg.val, crop=crop, scale=scale)
    else:
        _, items = _held_out(scan(cfg.data, crop=crop, scale=scale), cfg.val_count)
    if not items:
        raise SystemExit("no validation images: pass --val DIR")
    recipe = R.Recipe()
    vs = ValSet(items, crop=crop, scale=scale, seed=cfg.seed, recipe=recipe)
    sigmas = val_sigmas(recipe)  # (K,)
    out = []
    for i in range(len(vs)):
        s = vs[i]
        rep = {k: s[k][None].expand(len(sigmas), *s[k].shape) for k in ("hr", "lr", "lr_up", "noise")}
        out.append({**rep, "sigma": sigmas})  # (K, 3, ...), sigma (K,)
    return out


def per_sigma(batches: list[dict], denoise) -> torch.Tensor:
    """(K,) loss at each validation sigma, averaged over the images; its mean is the loop's validation
    loss."""
    rows = [R.edm_loss(denoise, b["hr"], b["sigma"], b["noise"], lr_up=b["lr_up"], lr=b["lr"])[1]
            for b in batches]
    return torch.stack(rows).mean(0)


def baselines(batches: list[dict]) -> dict[str, torch.Tensor]:
    """Per-sigma losses of denoisers that learned nothing: `lr_up` answers the bicubic 4x of the LR;
    `c_skip x` is an untrained network (output 0 through the EDM preconditioning); `blend` is the best mix of
    the noisy input and lr_up if HR = lr_up + Gaussian error of the validation crops' own variance (a
    stronger, fair "bicubic" denoiser at every sigma)."""
    sd = R.RECIPE.sigma_data
    err = torch.stack([(b["hr"][0] - b["lr_up"][0]).pow(2).mean() for b in batches]).mean()

    def blend(x, sigma, lr_up, lr):
        s2 = sigma.view(-1, 1, 1, 1) ** 2
        return (err * x + s2 * lr_up) / (err + s2)

    def skip(x, sigma, lr_up, lr):
        s2 = sigma.view(-1, 1, 1, 1) ** 2
        return sd**2 / (s2 + sd**2) * x

    return {"lr_up": per_sigma(batches, lambda x, sigma, lr_up, lr: lr_up),
            "c_skip x": per_sigma(batches, skip), "blend": per_sigma(batches, blend)}


def model_per_sigma(path: Path, batches: list[dict]) -> torch.Tensor:
    from infdit_cli.train.recipe import batch_loss
    from infdit_cli.weights.format import load_model

    model = load_model(path, device=torch.device("cpu"), dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.stack([batch_loss(model, model, b)[1] for b in batches]).mean(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("photos", type=Path)
    ap.add_argument("--val", type=Path, default=None, help="validation images (default: held out of PHOTOS)")
    ap.add_argument("--config", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--baseline-only", action="store_true", help="print the baselines' losses, no training")
    ap.add_argument("--weights", type=Path, default=None, help="with --baseline-only: also this trained file")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data=a.photos, output=Path(tmp) / "model.safetensors", config=a.config,
                          steps=a.steps, batch=a.batch, crop=a.crop, lr=a.lr, every=a.every, seed=a.seed,
                          val=a.val, workers=a.workers)
        batches = val_batches(cfg, a.crop)
        bl = baselines(batches)
        base = float(bl["lr_up"].mean())
        print(f"config {a.config}, crop {a.crop}, batch {a.batch}, lr {a.lr:g}, seed {a.seed}, "
              f"{torch.get_num_threads()} thread(s)")
        print("validation loss of denoisers that learned nothing: "
              + ", ".join(f"{k} {float(v.mean()):.4f}" for k, v in bl.items()))
        if not a.baseline_only:
            print(f"{'step':>6} {'val loss':>9} {'lr_up':>9} {'ratio':>6} {'seconds':>8}")
            t0 = time.perf_counter()

            def on_event(e) -> None:
                if isinstance(e, TrainValidated):
                    print(f"{e.step:>6} {e.loss:>9.4f} {base:>9.4f} {e.loss / base:>6.3f} "
                          f"{time.perf_counter() - t0:>8.0f}", flush=True)

            train(cfg, on_event=on_event)
            bl["trained"] = model_per_sigma(cfg.output, batches)
        elif a.weights is not None:
            bl["trained"] = model_per_sigma(a.weights, batches)
        sigmas = batches[0]["sigma"]
        print(f"{'sigma':>8} " + " ".join(f"{k:>9}" for k in bl))
        for i, s in enumerate(sigmas.tolist()):
            print(f"{s:>8.4f} " + " ".join(f"{float(v[i]):>9.4f}" for v in bl.values()))
        print(f"{'mean':>8} " + " ".join(f"{float(v.mean()):>9.4f}" for v in bl.values()))

if __name__ == "__main__":
    main()
