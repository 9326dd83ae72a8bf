"""What a long command is doing, while it does it.

On a terminal, a live line under the output shows a spinner, the current step and the time
elapsed (rich); every step is also printed above it, so the log of steps stays. Off a terminal
(CI, a pipe) steps are plain lines on stderr.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


@contextlib.contextmanager
def progress(label: str, plain: Callable[[str], None] | None = None) -> Iterator[Callable[[str], None]]:
    """``with progress("bench") as step: step("decoding ...")``; off a terminal each step goes to
    ``plain`` (stderr by default)."""
    if not sys.stderr.isatty():
        yield plain or (lambda line: print(line, file=sys.stderr, flush=True))
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn(f"[bold]{label}[/bold] {{task.description}}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def step(line: str) -> None:
            bar.console.print(line, markup=False, highlight=False)
            bar.update(task, description=line.splitlines()[0][:100] if line else "")

        yield step
