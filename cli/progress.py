"""Progress bars on stderr for the CLI's long jobs."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn


class StageBars:
    """One rich progress bar per named stage, on stderr: call it with (stage, done, total). Counts show as
    "done/total", or as a percentage with `percent` (stages counted in bytes)."""

    def __init__(self, *, percent: bool = False) -> None:
        from .main import err

        count = TaskProgressColumn() if percent else MofNCompleteColumn()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), count, TimeElapsedColumn(),
                                 console=err)
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)

    def __enter__(self) -> "StageBars":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)
