"""Progress reporting: one callable ``progress(what, done, total)`` threaded through steps.

The library reports; the CLI decides how to show it (:class:`RichProgress` draws a rich
progress bar per step). ``None`` means silent.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

ProgressFn = Callable[[str, int, int], None]


class RateColumn(ProgressColumn):
    """Items per second (frames per second for a video), once rich has measured it."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f}/s" if task.speed else "", style="progress.data.speed")


class RichProgress:
    """Context manager that turns ``progress(what, done, total)`` calls into rich bars."""

    def __init__(self, console: Console | None = None, transient: bool = False):
        self._bar = Progress(
            TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
            RateColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
            transient=transient,
        )
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> RichProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.stop()

    def __call__(self, what: str, done: int, total: int) -> None:
        if what not in self._tasks:
            self._tasks[what] = self._bar.add_task(what, total=total)
        self._bar.update(self._tasks[what], completed=done, total=total)

    def log(self, message: str) -> None:
        self._bar.console.print(message)
