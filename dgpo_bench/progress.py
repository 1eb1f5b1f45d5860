"""Progress bars with ETA on stderr (stdout stays free for --json output)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class ProgressReporter:
    """Rich progress bars, or nothing when disabled (non-main processes, tests).

    When stderr is not a terminal (a log file, ``nohup``), live bars cannot draw, so a plain
    line with the updated bar's state is printed instead, at most every ``plain_interval`` s."""

    plain_interval = 30.0

    def __init__(self, enabled: bool = True):
        self.console = Console(stderr=True)
        self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                             console=self.console, transient=False) if enabled else None
        self._plain = enabled and not (self.console.is_interactive or self.console.is_jupyter)
        self._last_line: float | None = None

    def __enter__(self) -> "ProgressReporter":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def task(self, description: str, total: float | None) -> int | None:
        return self._bar.add_task(description, total=total) if self._bar is not None else None

    def advance(self, task: int | None, n: float = 1) -> None:
        if self._bar is not None and task is not None:
            self._bar.update(task, advance=n)
            self._plain_line(task)

    def update(self, task: int | None, **fields) -> None:
        """Set a task's fields, e.g. ``completed`` or ``description``."""
        if self._bar is not None and task is not None:
            self._bar.update(task, **fields)
            self._plain_line(task)

    def finish(self, task: int | None) -> None:
        if self._bar is not None and task is not None:
            self._bar.remove_task(task)

    def log(self, message: str) -> None:
        if self._bar is not None:
            self.console.print(message)

    def _plain_line(self, task: int) -> None:
        now = time.monotonic()
        if not self._plain or (self._last_line is not None and now - self._last_line < self.plain_interval):
            return
        self._last_line = now
        t = next(t for t in self._bar.tasks if t.id == task)
        total = f"{t.total:.0f}" if t.total is not None else "?"
        self.console.print(f"{t.description}: {t.completed:.0f}/{total}, {_clock(t.elapsed)} elapsed, "
                           f"eta {_clock(t.time_remaining)}", highlight=False, markup=False)
