"""Training data: a folder of HR images (the LR made by the degradation pipeline), or `hr/` + `lr/` pairs.

Every random choice of a sample (its crop, its degradation, its LR dropout, its sigma and noise) is drawn
from a generator seeded by (seed, epoch, index), in the data worker that decodes it: the batches of a step
do not depend on how many workers or ranks made them, and a resumed run sees the very samples it would
have seen. Position p of the stream is sample `order(epoch)[p % N]` of epoch p // N.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import BadImage, BadRequest
from ..images.load import fill_transparent, load_image, probe_size
from ..jobs.batch import IMAGE_SUFFIXES
from . import recipe as R

__all__ = ["Item", "TrainSet", "ValSet", "files_digest", "positions", "sample_generator", "scan",
           "worker_init"]


@dataclass(frozen=True)
class Item:
    """One training image: its HR file and, for paired data, its LR file."""

    hr: Path
    lr: Path | None = None

    @property
    def name(self) -> str:
        return str(self.hr) if self.lr is None else f"{self.hr} / {self.lr}"


def _images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def scan(root: str | Path, *, crop: int, scale: int,
         on_skip: Callable[[str], None] | None = None) -> list[Item]:
    """The usable images of `root`: every image file below it, or the pairs of `root/hr` and `root/lr`
    (matched by their path below those folders, the suffix aside). Each file that cannot be read, is
    smaller than the crop, or (paired) whose LR is not 1/`scale` of its HR is skipped with one line to
    `on_skip`; only the headers are read here.

    Raises:
        BadRequest: `root` is not a folder, or nothing usable is left.
    """
    root = Path(root)
    if not root.is_dir():
        raise BadRequest(f"training data {root} is not a folder")
    skip = on_skip or (lambda text: None)
    paired = (root / "hr").is_dir() and (root / "lr").is_dir()
    items: list[Item] = []
    if paired:
        lrs = {p.relative_to(root / "lr").with_suffix(""): p for p in _images(root / "lr")}
        for hr in _images(root / "hr"):
            lr = lrs.get(hr.relative_to(root / "hr").with_suffix(""))
            if lr is None:
                skip(f"{hr}: no LR image of the same name in {root / 'lr'}; skipped")
                continue
            try:
                (h, w), (lh, lw) = probe_size(hr), probe_size(lr)
            except BadImage as e:
                skip(f"{e}; skipped")
                continue
            if (lh * scale, lw * scale) != (h, w):
                skip(f"{hr} ({w}x{h}) and {lr} ({lw}x{lh}): not a {scale}x pair; skipped")
                continue
            if min(h, w) < crop:
                skip(f"{hr} ({w}x{h}) is smaller than the {crop} px crop; skipped")
                continue
            items.append(Item(hr, lr))
    else:
        for hr in _images(root):
            try:
                h, w = probe_size(hr)
            except BadImage as e:
                skip(f"{e}; skipped")
                continue
            if min(h, w) < crop:
                skip(f"{hr} ({w}x{h}) is smaller than the {crop} px crop; skipped")
                continue
            items.append(Item(hr))
    if not items:
        what = "no HR/LR pair" if paired else "no image"
        raise BadRequest(f"{root}: {what} usable for training at crop {crop} (see the lines above)")
    return items


def files_digest(items: list[Item], root: str | Path) -> str:
    """sha256 of the sorted list of the files' paths below `root` (the data's provenance)."""
    root = Path(root)
    names = sorted(str(p.relative_to(root)) for it in items for p in (it.hr, it.lr) if p is not None)
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def sample_generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator for (seed, *key), the key's parts mixed by numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, *key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


_ORDER, _VAL = 1 << 30, (1 << 30) + 1  # generator keys apart from any epoch number


def _order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=sample_generator(seed, _ORDER, epoch))


def _read(path: Path) -> torch.Tensor:
    """(3, h, w) in [-1, 1], as `upscale` reads an image (transparent pixels filled from their neighbours)."""
    img = load_image(path)
    rgb = fill_transparent(img.rgb, img.alpha) if img.alpha is not None else img.rgb  # (1, 3, h, w)
    if rgb.shape[1] == 1:
        rgb = rgb.expand(-1, 3, -1, -1)
    return rgb[0].mul(2).sub(1)


class TrainSet(torch.utils.data.Dataset):
    """Samples by stream position (see the module doc): dicts of hr, lr, lr_up, noise (the crop's), sigma."""

    def __init__(self, items: list[Item], *, crop: int, scale: int, seed: int, recipe: R.Recipe) -> None:
        self.items, self.crop, self.scale, self.seed = items, crop, scale, seed
        self.recipe = recipe.scaled(crop)
        self._orders: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return 1 << 62  # a stream: positions index it

    def index(self, pos: int) -> tuple[int, int]:
        """(epoch, item index) at stream position `pos`."""
        n = len(self.items)
        epoch = pos // n
        if epoch not in self._orders:
            self._orders = {epoch: _order(self.seed, epoch, n)}
        return epoch, int(self._orders[epoch][pos % n])

    def __getitem__(self, pos: int) -> dict:
        """The sample at `pos`; an image that fails to decode now (its header read well at `scan`) is
        replaced by the next image of the epoch's order, and named in the sample's "skipped"."""
        epoch, _ = self.index(pos)
        n, skipped = len(self.items), []
        for k in range(n):
            j = int(self._orders[epoch][(pos + k) % n])
            try:
                sample = make_sample(self.items[j], sample_generator(self.seed, epoch, j), crop=self.crop,
                                     scale=self.scale, recipe=self.recipe, train=True)
            except BadImage as e:
                skipped.append(f"{e}; skipped")
                continue
            sample["skipped"] = "\n".join(skipped)
            return sample
        raise BadImage(f"no image of the training data can be decoded any more: {skipped[-1]}")


class ValSet(torch.utils.data.Dataset):
    """Validation: one fixed crop per image, no LR dropout, the same generator on every call."""

    def __init__(self, items: list[Item], *, crop: int, scale: int, seed: int, recipe: R.Recipe) -> None:
        self.items, self.crop, self.scale, self.seed = items, crop, scale, seed
        self.recipe = recipe.scaled(crop)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        gen = sample_generator(self.seed, _VAL, i)
        return make_sample(self.items[i], gen, crop=self.crop, scale=self.scale, recipe=self.recipe,
                           train=False)


def make_sample(item: Item, gen: torch.Generator, *, crop: int, scale: int, recipe: R.Recipe,
                train: bool) -> dict:
    """Decode, crop, degrade (HR-only data), LR dropout (training), sigma and noise: all from `gen`.
    `recipe` is already scaled to the crop (`Recipe.scaled`)."""
    hr = _read(item.hr)
    lr = _read(item.lr) if item.lr is not None else None
    try:
        hr, lr = R.random_crop_pair(hr, gen, recipe, lr=lr, name=item.name)  # (3, S, S), (3, S/s, S/s)
    except ValueError as e:
        raise BadImage(str(e)) from None
    lr_up = R.concat_lr(lr, scale)  # (3, S, S): clipped bicubic
    if train:
        lr, lr_up, _ = R.lr_dropout(lr[None], lr_up[None], gen, recipe.lr_dropout)
        lr, lr_up = lr[0], lr_up[0]
    sigma = R.sample_sigma(1, gen, recipe)[0]
    noise = torch.randn(hr.shape, generator=gen)  # (3, S, S)
    return {"hr": hr.contiguous(), "lr": lr.contiguous(), "lr_up": lr_up, "noise": noise, "sigma": sigma}


def positions(step: int, steps: int, batch: int, rank: int, world: int) -> list[int]:
    """This rank's stream positions for steps `step`..`steps`-1: of each step's `batch` positions, the
    contiguous share of `rank` (batch / world each)."""
    share = batch // world
    return [s * batch + rank * share + j for s in range(step, steps) for j in range(share)]


def worker_init(_: int) -> None:
    """A data worker: one thread, and Ctrl-C / SIGTERM left to the main process (which stops at a step
    boundary and shuts the workers down)."""
    torch.set_num_threads(1)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
