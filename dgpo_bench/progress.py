"""Progress bars with ETA on stderr (stdout stays free for --json output)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressReporter:
    """Rich progress bars, or nothing when disabled (non-main processes, tests)."""

    def __init__(self, enabled: bool = True):
        self.console = Console(stderr=True)
        self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                             console=self.console, transient=False) if enabled else None

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

    def update(self, task: int | None, **fields) -> None:
        """Set a task's fields, e.g. ``completed`` or ``description``."""
        if self._bar is not None and task is not None:
            self._bar.update(task, **fields)

    def finish(self, task: int | None) -> None:
        if self._bar is not None and task is not None:
            self._bar.remove_task(task)

    def log(self, message: str) -> None:
        if self._bar is not None:
            self.console.print(message)
