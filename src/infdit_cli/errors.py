"""Domain errors. Each carries the process exit code the CLI uses for it."""

from __future__ import annotations

import errno

__all__ = [
    "InfditError",
    "ConvertError",
    "WeightsError",
    "WeightsNotFound",
    "HubError",
    "ChecksumMismatch",
    "DownloadError",
    "InvalidReference",
    "BadImage",
    "OutputExists",
    "OutputError",
    "MemoryBudgetTooSmall",
    "HostMemoryTooSmall",
    "OutOfMemory",
    "BadRequest",
    "Interrupted",
    "Signalled",
    "UnsafePath",
    "Busy",
    "DiskFull",
    "DiskTooSmall",
    "NonFinite",
    "explain",
    "lost_contact",
    "signal_name",
    "stopped_by",
]


class InfditError(Exception):
    """Base class: a problem the user can act on, reported as one line."""

    exit_code = 1


class ConvertError(InfditError):
    """The official checkpoint could not be read or is not an Inf-DiT checkpoint."""


class WeightsError(InfditError):
    """A weights file is malformed or not an Inf-DiT model."""


class WeightsNotFound(WeightsError):
    """No weights file at the given path, Hub reference or registry name."""


class HubError(WeightsError):
    """The Hugging Face Hub could not provide the file."""


class ChecksumMismatch(WeightsError):
    """A downloaded file's sha256 differs from the manifest's."""


class DownloadError(WeightsError):
    """A download could not complete: host unreachable, HTTP error, connection lost, disk full."""


class InvalidReference(WeightsError):
    """A weights reference that is no path, registry name, URL or well-formed Hub reference."""

    exit_code = 2


class BadImage(InfditError):
    """An input image is missing, unreadable, truncated or too large."""


class TooManyPixels(BadImage):
    """An input image has more pixels than the limit (--max-pixels); `infdit serve` answers it 413."""


class OutputExists(InfditError):
    """The output file exists and --overwrite was not given."""


class OutputError(InfditError):
    """The output file cannot be written: its folder is missing or read-only, or it is a folder."""


class MemoryBudgetTooSmall(InfditError):
    """Not even one block at a time fits in the memory budget (an impossible request: exit 2)."""

    exit_code = 2


class HostMemoryTooSmall(InfditError):
    """The host cannot hold even the leanest plan for the job."""

    exit_code = 2


class OutOfMemory(InfditError):
    """The device ran out of memory even under the leanest plan."""

    exit_code = 3


class BadRequest(InfditError):
    """The requested size, scale or option combination cannot be done."""

    exit_code = 2


class Interrupted(InfditError):
    """Ctrl-C, SIGTERM or SIGHUP stopped the work; the message says how to resume, where progress was kept.
    Exit 128 + the signal's number: 130 (SIGINT), 143 (SIGTERM), 129 (SIGHUP)."""

    exit_code = 130


class Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived (the CLI's handler raises it): handled everywhere Ctrl-C is."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def what(self) -> str:
        return stopped_by(self.signum)


class UnsafePath(InfditError):
    """A run folder, scratch folder or lock path that is not infdit's own (a link, a file, another user's or
    an unmarked folder): refused, never written into or deleted."""


class Busy(InfditError):
    """Another infdit process is writing the same output."""


class DiskFull(InfditError):
    """The disk filled up during the work (scratch or checkpoint files)."""


class DiskTooSmall(InfditError):
    """The job's scratch and checkpoint files do not fit on the disk (found before any weights load)."""

    exit_code = 2


class NonFinite(InfditError):
    """The sampler state or the image holds NaN or Inf: no output is written."""


def signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def stopped_by(signum: int) -> str:
    """A stop by `signum` as the one-line error says it: "interrupted" (SIGINT), else "terminated by
    SIGTERM"."""
    return "interrupted" if signum == 2 else f"terminated by {signal_name(signum)}"


def lost_contact(exc: BaseException) -> bool:
    """Whether `exc` is torch.distributed's failure to reach another rank (gone, or past the timeout)."""
    return type(exc).__name__ in ("DistBackendError", "DistNetworkError", "DistStoreError", "DistError") or (
        type(exc) is RuntimeError and "gloo/transport" in str(exc))  # gloo: a peer gone or timed out


def explain(exc: BaseException) -> tuple[str, int]:
    """Any exception as (one line for the user, exit code): the CLI's error funnel and the server's JSON
    errors say the same thing."""
    # Order matters: subclasses before their bases.
    if isinstance(exc, InfditError):
        return str(exc), exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        if getattr(exc, "signum", None):  # errors.Signalled: SIGTERM / SIGHUP
            return exc.what, exc.exit_code
        return "interrupted", 130
    if isinstance(exc, MemoryError):
        return "out of host memory; try a smaller --mem-budget or --block-batch", 1
    if type(exc).__name__ == "OutOfMemoryError":  # torch's, escaping the planner's retries
        return "out of device memory even at block batch 1; try --device cpu", 3
    if lost_contact(exc):
        return ("lost contact with another rank (it failed, was killed, or did not answer within "
                "INFDIT_RANK_TIMEOUT); its own error, if any, is on its stderr"), 1
    if no_space(exc):
        return f"no space left on device: {exc.filename or ''}".rstrip(": "), 1
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename}", 1
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), 1
    return f"internal error: {type(exc).__name__}: {exc}", 1


def no_space(exc: BaseException) -> bool:
    """A write refused for want of space: the disk is full (ENOSPC) or the user's quota is (EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
