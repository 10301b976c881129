"""`infdit` with rank 1 always out of device memory in the band engine (run by test_ranks.py through
`infdit_cli.launch`): every rank must step down together to the leanest plan and exit 3."""

import os

import torch

from infdit_cli import bands
from infdit_cli.cli.app import main

_rect = bands.BandEngine._rect


def _oom_on_rank_1(self, *args, **kw):
    if os.environ.get("RANK") == "1":
        raise torch.OutOfMemoryError("injected")
    return _rect(self, *args, **kw)


bands.BandEngine._rect = _oom_on_rank_1
main()
