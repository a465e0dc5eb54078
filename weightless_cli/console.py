"""Human output on stderr (rich), machine output on stdout (one JSON object).

Stages return plain data; only this module and cli.py know how it is shown.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

Column = tuple[str, str, Callable[[object], str]]  # (key, header, formatter)


def fmt_int(value: object) -> str:
    return f"{int(value):,}"


def fmt_pct(value: object) -> str:
    return f"{100 * float(value):.2f}%"


def fmt_float(value: object) -> str:
    return f"{float(value):.4g}"


def fmt_ratio(value: object) -> str:
    return f"{float(value):.1f}x"


def fmt_bytes(value: object) -> str:
    size, unit = float(value), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"


def fmt_str(value: object) -> str:
    if isinstance(value, list | tuple):
        return "×".join(str(v) for v in value) if all(isinstance(v, int) for v in value) else ",".join(map(str, value))
    return str(value)


@dataclass
class Reporter:
    """Where a command's output goes, per its --json and --quiet options."""

    as_json: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        self.err = Console(stderr=True, highlight=False, soft_wrap=False)
        if not self.err.is_terminal:
            # Logs and pipes have no width; don't squeeze tensor names into 80 columns.
            self.err.width = 200

    @property
    def human(self) -> bool:
        return not (self.quiet or self.as_json)

    def info(self, message: str) -> None:
        if self.human:
            self.err.print(message)

    def warn(self, message: str) -> None:
        # Warnings matter even in --json mode; only --quiet silences them.
        if not self.quiet:
            self.err.print(f"[yellow]warning:[/yellow] {message}", markup=True)

    def table(self, title: str, rows: Sequence[dict], columns: Sequence[Column], footer: dict | None = None) -> None:
        if not self.human or not rows:
            return
        table = Table(title=title, title_justify="left", show_footer=footer is not None)
        for index, (key, header, _) in enumerate(columns):
            text_footer = "" if footer is None else (columns[index][2](footer[key]) if key in footer else "")
            table.add_column(header, footer=text_footer, justify="left" if index == 0 else "right", no_wrap=True,
                             overflow="fold")
        for row in rows:
            table.add_row(*(fmt(row[key]) if row.get(key) is not None else "-" for key, _, fmt in columns))
        self.err.print(table)

    def result(self, payload: dict) -> None:
        """The command's summary: one JSON object on stdout with --json."""
        if self.as_json:
            sys.stdout.write(json.dumps(payload, indent=2, default=_json_default) + "\n")

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """Yield ``advance(n)``; draws a bar only when stderr is a terminal."""
        if not self.human or not self.err.is_terminal:
            yield lambda n=1: None
            return
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn())
        with Progress(*columns, console=self.err, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)


def _json_default(value: object) -> object:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)
