"""`infdit` with a fault injected on rank 1 in the band engine (run by test_ranks.py through
`infdit_cli.launch`):

    fault_cli.py oom COMMAND ...    rank 1 always out of device memory: every rank steps down together to
                                    the leanest plan and exits 3
    fault_cli.py disk COMMAND ...   rank 1's 7th rectangle fails with a full disk (its own error, mid-call,
                                    while rank 0 waits on it): the job ends at once with rank 1's line
"""

import errno
import os
import sys

import torch

from infdit_cli.cli.app import main
from infdit_cli.engine import bands

FAULT = sys.argv.pop(1)
_rect = bands.BandEngine._rect
_count = [0]


def _faulty(self, *args, **kw):
    _count[0] += 1
    if os.environ.get("RANK") == "1":
        if FAULT == "oom":
            raise torch.OutOfMemoryError("injected")
        if FAULT == "disk" and _count[0] == 7:
            raise OSError(errno.ENOSPC, "No space left on device", "/scratch/injected")
    return _rect(self, *args, **kw)


bands.BandEngine._rect = _faulty
main()
