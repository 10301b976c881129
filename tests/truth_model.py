"""A test denoiser that answers its LR condition: D(x; sigma) = lr_up (tests/test_truth.py).

`install()` patches `InfDiT.embed` and `InfDiT.head` on the class, nothing in the product: the engine still
runs every layer of the real (random) network, in whatever block mode, cache placement or band it chose,
and only the network output F of each rectangle is replaced. `embed` sees xin = cat(x, lr_up) * c_in (the
engine's own slices of the state and of lr_up, padded to whole blocks); `head` returns

    F = (lr_up - c_skip x) / c_out,   so the engine's   c_skip x + c_out F = lr_up   (to float32 rounding).

With D = lr_up, every Heun step moves x toward lr_up, and the last one (to sigma = 0) lands on it:
x_N = x + (0 - sigma) (x - lr_up) / sigma = lr_up. `upscale` then is a bicubic upscaler, and a file's
whole path can be checked against an independent bicubic of the input.

Processes a test starts pick it up through `truth_site/sitecustomize.py` (`env()` puts it on PYTHONPATH).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from infdit_cli.model.infdit import InfDiT

SITE = Path(__file__).resolve().parent / "truth_site"
_embed, _head = InfDiT.embed, InfDiT.head


def truth_embed(self: InfDiT, xin: torch.Tensor) -> torch.Tensor:
    """The real embedding (the layers run on it), with the rectangle's input kept for `truth_head`."""
    self.__dict__["_truth_xin"] = xin  # (B, 6, Gh*bs, Gw*bs)
    return _embed(self, xin)


def truth_head(self: InfDiT, h: torch.Tensor, step) -> torch.Tensor:
    """F such that the engine's c_skip x + c_out F is this rectangle's lr_up: (B, 3, Gh*bs, Gw*bs)."""
    xin = self.__dict__.pop("_truth_xin")
    bs = self.config.block_size
    if tuple(xin.shape[-2:]) != (h.shape[1] * bs, h.shape[2] * bs):  # the rectangle embed saw is this one
        raise AssertionError(f"head of {tuple(h.shape[:3])} blocks after embed of {tuple(xin.shape)}")
    c_skip, c_out, c_in = (t.to(xin.device, torch.float64).view(-1, 1, 1, 1)
                           for t in (step.c_skip, step.c_out, step.c_in))
    x, lr_up = (xin.double() / c_in).chunk(2, dim=1)  # (B, 3, ...) each
    return ((lr_up - c_skip * x) / c_out).to(xin.dtype)


def install() -> None:
    """Make every `InfDiT` in this process the truth denoiser."""
    InfDiT.embed, InfDiT.head = truth_embed, truth_head


def uninstall() -> None:
    InfDiT.embed, InfDiT.head = _embed, _head


def env(base: dict | None = None) -> dict:
    """An environment whose Python processes (the `infdit` command, torchrun's ranks) install it at start."""
    base = dict(os.environ if base is None else base)
    base["PYTHONPATH"] = os.pathsep.join([str(SITE), *filter(None, [base.get("PYTHONPATH")])])
    base["HF_HUB_OFFLINE"] = "1"
    return base
