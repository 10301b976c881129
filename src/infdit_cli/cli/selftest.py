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
from . import _options as O

EXAMPLES = """Examples:

  infdit selftest --device cpu

  infdit selftest --device cuda -o selftest.md
"""

_MARK = {"pass": "ok", "fail": "FAIL", "info": "-", "skip": "n/a"}


def selftest(
    device: O.Device = "auto",
    fixtures: Annotated[Optional[Path], typer.Option(
        help="Folder holding upstream-a/ and upstream-a-bf16/ (default: the repository's test data and "
             "../shared/fixtures).")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "-o", "--output", help="Also write the report as Markdown.")] = None,
    overwrite: O.Overwrite = False,
    json_: O.Json = False,
    quiet: O.Quiet = False,
) -> None:
    """Check parity, bf16, memory predictions and speed on this device, and print the numbers.

    fp32 parity with the official code (one call, a 20-step sample, block modes n = 1, 2, 4, host vs
    device K/V cache); bf16 within 1.5x the official bf16 path's distance from fp32; predicted vs
    measured peak memory; seconds and TFLOP/s per denoiser call; one call of the biggest plan. On CUDA at
    the product's sizes (official config, bf16, 8 GB budget); elsewhere the same checks at toy sizes.
    Exit 0 when no check failed, 1 otherwise.
    """
    from ..selftest import run_selftest

    if output is not None:  # before any work
        if output.exists() and not overwrite:
            raise OutputExists(f"{output} exists; pass --overwrite to replace it")
        if not output.parent.is_dir():
            raise BadRequest(f"output directory does not exist: {output.parent}")
    display = _Display(enabled=not quiet and sys.stderr.isatty())
    try:
        report = run_selftest(device=device, fixtures=fixtures, on_event=display)
    finally:
        display.stop()
    if output is not None:
        tmp = output.with_name(f".{output.name}.tmp")
        tmp.write_text(markdown(report, " ".join(["infdit", "selftest", *sys.argv[2:]])))
        os.replace(tmp, output)
    if json_:
        typer.echo(json.dumps({**asdict(report), "passed": report.passed}))
    else:
        _print_table(report)
    raise typer.Exit(0 if report.passed else 1)


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
        from ..events import CheckDone, CheckStarted

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

    verdict = "all checks passed" if report.passed else "SOME CHECKS FAILED"
    table = Table(title=f"infdit selftest on {report.device} ({report.profile} sizes): {verdict}, "
                        f"{report.seconds:.0f} s", title_justify="left")
    for col in ("", "check", "measured", "criterion", "s"):
        table.add_column(col, justify="right" if col == "s" else "left")
    for c in report.checks:
        mark = {"pass": "[green]ok[/]", "fail": "[bold red]FAIL[/]"}.get(c.status, _MARK[c.status])
        table.add_row(mark, c.name, c.value, c.criterion, f"{c.seconds:.1f}")
    Console().print(table)


def markdown(report, command: str) -> str:
    """The report as a Markdown section: command, environment, one table."""
    env = ", ".join(f"{k} {v}" for k, v in report.environment.items())
    lines = [
        f"## `infdit selftest` on {report.device} ({report.profile} sizes)",
        "",
        f"Command: `{command}`. {env}. "
        f"{'All checks passed' if report.passed else 'Some checks FAILED'} in {report.seconds:.0f} s.",
        "",
        "| | group | check | measured | criterion | s |",
        "|---|---|---|---|---|---|",
    ]
    for c in report.checks:
        cells = [_MARK[c.status], c.group, c.name, c.value, c.criterion or "-", f"{c.seconds:.1f}"]
        lines.append("| " + " | ".join(s.replace("|", "\\|") for s in cells) + " |")
    return "\n".join(lines) + "\n"
