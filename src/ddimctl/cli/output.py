"""What the command line prints: its two consoles, notes and result lines, and progress (a rich
bar in a terminal, plain lines in logs and pipes)."""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .. import threads
from ..errors import DdimctlError, spell

# Outside a terminal rich would wrap at 80 columns; tables piped to a file should keep their rows.
stderr = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 160)


stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def flag(name: str) -> str:
    """The command-line spelling of a library parameter: batch_size is --batch-size."""
    return "--" + name.replace("_", "-")


def note(message: str) -> None:
    stderr.print(Text(spell(message, flag), style="dim"))


def say(message: str) -> None:
    stderr.print(message, markup=False, highlight=False)


def finish(message: str) -> None:
    """A command's last line, what it wrote: on stdout, so `ddimctl sample > log.txt` keeps it (progress,
    notes and errors go to stderr)."""
    stdout.print(message, markup=False, highlight=False)


class ImagesPerSecond(ProgressColumn):
    """Speed in images per second, from a task counted in network calls of single images; and a
    remark when the rate collapsed (other work took the CPU)."""

    def __init__(self):
        super().__init__()
        self.slowdown = threads.Slowdown()

    def render(self, task) -> Text:
        per_image = task.fields.get("calls_per_image", 1)
        text = images_per_second(task.speed / per_image if task.speed else 0.0)
        slow = self.slowdown.update(time.perf_counter(), task.completed)
        return Text(text + (f"  ({slow})" if slow else ""), style="progress.data.speed")


def progress_seconds(default: float = 5.0) -> float:
    """$DDIMCTL_PROGRESS_SECONDS, the seconds between plain progress lines: a number >= 0, or a
    one-line error naming the variable (a setting that is silently passed over is a surprise later)."""
    text = os.environ.get("DDIMCTL_PROGRESS_SECONDS")
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise DdimctlError(f"DDIMCTL_PROGRESS_SECONDS={text!r} is not a number of seconds >= 0; fix it or unset it")
    return value


class PlainProgress:
    """Progress for logs and pipes: a plain line every few seconds (rich draws nothing there until
    the end), with done/total, rate, elapsed and time left."""

    def __init__(self, description: str, total: int, per_image: int = 1, unit: str = "calls", image_rate: bool | None = None):
        self.description, self.total, self.per_image, self.unit = description, total, per_image, unit
        self.image_rate = unit == "calls" if image_rate is None else image_rate  # else the unit's own rate
        self.every = progress_seconds()
        self.started = self.last = time.perf_counter()
        self.done = 0
        self.slowdown = threads.Slowdown()

    def advance(self, n: int = 1, extra: str = "") -> None:
        self.update(self.done + n, extra)

    def update(self, done: int, extra: str = "") -> None:
        self.done = done
        now = time.perf_counter()
        if now - self.last < self.every and done < self.total:
            return
        self.last, elapsed = now, now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else float("nan")
        speed = images_per_second(rate / self.per_image) if self.image_rate else f"{rate:.1f} {self.unit}/s"
        slow = self.slowdown.update(now, done)
        print(f"{self.description}: {done}/{self.total} {self.unit}, {speed}{extra}, elapsed {clock(elapsed)}, "
              f"left {clock(left)}{'; ' + slow if slow else ''}", file=sys.stderr, flush=True)


def images_per_second(rate: float) -> str:
    """A rate that reads well at any speed: 12.3 img/s, or 4.1 s/img when below one image a second."""
    if rate <= 0:
        return "-- img/s"
    return f"{rate:.1f} img/s" if rate >= 1 else f"{1 / rate:.1f} s/img"


def clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


@contextmanager
def progress_bar(description: str, images_count: int, calls_per_image: int, enabled: bool = True, unit: str = "calls"):
    """A bar over every network call of every image; yields advance(n_images) for one call on a batch.
    unit "steps": one advance per step, for work whose calls per step vary (exact inversion)."""
    if not stderr.is_terminal:
        plain = PlainProgress(description, images_count * calls_per_image, calls_per_image, unit, image_rate=True)
        yield plain.advance if enabled else (lambda n: None)
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        ImagesPerSecond(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=stderr,
        transient=False,
        disable=not enabled,
    ) as bar:
        task = bar.add_task(description, total=images_count * calls_per_image, calls_per_image=calls_per_image)
        yield lambda n: bar.advance(task, n)


# What a command has done so far, for the line Ctrl-C prints (set by long-running commands).
progress_on_interrupt: list = []
