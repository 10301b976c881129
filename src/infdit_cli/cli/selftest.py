"""`infdit selftest`: one command that says whether everything holds on this device."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import BadRequest, OutputExists
from ..events import CheckDone, CheckStarted, SelftestStarted
from ..files import atomic_write
from . import _options as O

EXAMPLES = """Examples:

  infdit selftest --device cpu

  infdit selftest --device cuda -o selftest.md
"""

_MARK = {"pass": "ok", "fail": "FAIL", "info": "-", "skip": "n/a"}


def selftest(
    device: O.Device = "auto",
    fixtures: Annotated[Optional[Path], typer.Option(
        help="Folder holding upstream-a/ and upstream-a-bf16/ (default: the copy that ships with the "
             "package). Without fixtures the parity and bf16 rows are skipped.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "-o", "--output", help="Also write the report as Markdown (rewritten after every check, so a run "
                               "that is killed leaves the rows it finished).")] = None,
    jsonl: Annotated[Optional[Path], typer.Option(
        "--jsonl", help="Append one JSON line per finished check to this file, the moment it finishes "
                        "(first line: device, environment and the plan of checks; "
                        "last: the verdict).")] = None,
    time_budget: Annotated[Optional[float], typer.Option(
        "--time-budget", min=1.0, max=86400.0, metavar="SECONDS",
        help="Do not start a check whose predicted time would overrun this many seconds for the whole "
             "run; its row says so.")] = None,
    overwrite: O.Overwrite = False,
    json_: O.Json = False,
    quiet: O.Quiet = False,
) -> None:
    """Check parity, bf16, memory predictions and speed on this device, and print the numbers.

    fp32 parity with the official code (one call, a 20-step sample, block modes n = 1, 2, 4, host vs
    device K/V cache); bf16 within 1.5x the official bf16 path's distance from fp32; predicted vs
    measured peak memory; seconds and TFLOP/s per denoiser call; one call of the biggest plan. On CUDA at
    the product's sizes (official config, bf16, 8 GB budget; also the default full-memory plan and the
    attention kernels); elsewhere the same checks at toy sizes.
    Exit 0 when no check failed, 1 otherwise.
    """
    from ..tools.selftest import run_selftest  # torch: kept off start-up (--help, usage errors)

    for path in (output, jsonl):  # before any work
        if path is None:
            continue
        if path.exists() and not overwrite:
            raise OutputExists(f"{path} exists; pass --overwrite to replace it")
        if not path.parent.is_dir():
            raise BadRequest(f"output directory does not exist: {path.parent}")
    command = " ".join(["infdit", "selftest", *sys.argv[2:]])
    display = _Display(enabled=not quiet and sys.stderr.isatty())
    sink = _Sink(jsonl, output, command, lines=not quiet and not sys.stderr.isatty())
    try:
        report = run_selftest(device=device, fixtures=fixtures, time_budget=time_budget,
                              on_event=lambda e: (sink(e), display(e)))
    finally:
        display.stop()
    sink.finish(report)
    if json_:
        typer.echo(json.dumps({**asdict(report), "passed": report.passed}))
    else:
        _print_table(report)
    raise typer.Exit(0 if report.passed else 1)


class _Sink:
    """Keeps every finished row on disk as it comes: a JSON line appended (flushed and fsynced) to
    `jsonl`, the Markdown report rewritten (atomically) at `output`, and a plain line on stderr."""

    def __init__(self, jsonl: Path | None, output: Path | None, command: str, lines: bool) -> None:
        self.jsonl, self.output, self.command, self.lines = jsonl, output, command, lines
        self.started = None
        self.checks: list = []
        if jsonl is not None:
            jsonl.write_text("")

    def _append(self, record: dict) -> None:
        if self.jsonl is None:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _markdown(self, report) -> None:
        if self.output is not None:
            atomic_write(self.output, markdown(report, self.command))

    def __call__(self, event: object) -> None:
        from ..tools.selftest import SelftestReport  # torch: kept off start-up (--help, usage errors)

        if isinstance(event, SelftestStarted):
            self.started = event
            self._append({"kind": "start", **asdict(event)})
            if self.lines:
                budget = ("no time budget" if event.time_budget is None
                          else f"time budget {event.time_budget:.0f} s")
                total = sum(s for _, s in event.planned)
                print(f"selftest on {event.device} ({event.profile} sizes): {len(event.planned)} checks, "
                      f"predicted {total:.0f} s, {budget}", file=sys.stderr, flush=True)
        elif isinstance(event, CheckDone):
            c = event.check
            self.checks.append(c)
            self._append({"kind": "check", "index": event.index, "total": event.total, **asdict(c)})
            if self.lines:
                print(f"[{event.index}/{event.total}] {_MARK[c.status]} {c.name}: {c.value} "
                      f"({c.seconds:.1f} s)",
                      file=sys.stderr, flush=True)
            st = self.started
            if st is not None:
                self._markdown(SelftestReport(st.device, st.profile, st.environment, list(self.checks),
                                              sum(x.seconds for x in self.checks)))

    def finish(self, report) -> None:
        self._append({"kind": "end", "passed": report.passed, "seconds": report.seconds})
        self._markdown(report)


class _Display:
    """A progress bar over the checks (rich, stderr); nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.progress = self.task = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self.progress.start()

    def __call__(self, event: object) -> None:
        if self.progress is None:
            return
        if isinstance(event, CheckStarted):
            if self.task is None:
                self.task = self.progress.add_task("", total=event.total)
            self.progress.update(self.task, completed=event.index - 1, description=f"selftest: {event.name}")
        elif isinstance(event, CheckDone) and event.check.status == "fail":
            self.progress.console.print(f"[red]FAIL[/] {event.check.name}: {event.check.value}")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _print_table(report) -> None:
    from rich.console import Console
    from rich.table import Table

    verdict = ("all checks passed" if report.passed else "SOME CHECKS FAILED") + _not_run(report)
    table = Table(title=f"infdit selftest on {report.device} ({report.profile} sizes): {verdict}, "
                        f"{report.seconds:.0f} s", title_justify="left")
    for col in ("", "check", "measured", "criterion", "s"):
        table.add_column(col, justify="right" if col == "s" else "left")
    for c in report.checks:
        mark = {"pass": "[green]ok[/]", "fail": "[bold red]FAIL[/]"}.get(c.status, _MARK[c.status])
        table.add_row(mark, c.name, c.value, c.criterion, f"{c.seconds:.1f}")
    Console().print(table)


def _not_run(report) -> str:
    k = sum(c.status == "skip" and c.value.startswith("not run:") for c in report.checks)
    return f" ({k} not run: time budget)" if k else ""


def markdown(report, command: str) -> str:
    """The report as a Markdown section: command, environment, one table."""
    env = ", ".join(f"{k} {v}" for k, v in report.environment.items())
    lines = [
        f"## `infdit selftest` on {report.device} ({report.profile} sizes)",
        "",
        f"Command: `{command}`. {env}. "
        f"{'All checks passed' if report.passed else 'Some checks FAILED'}{_not_run(report)} in "
        f"{report.seconds:.0f} s.",
        "",
        "| | group | check | measured | criterion | s |",
        "|---|---|---|---|---|---|",
    ]
    for c in report.checks:
        cells = [_MARK[c.status], c.group, c.name, c.value, c.criterion or "-", f"{c.seconds:.1f}"]
        lines.append("| " + " | ".join(s.replace("|", "\\|") for s in cells) + " |")
    return "\n".join(lines) + "\n"
