"""CPU threads for a machine shared with other work, decided before torch starts its thread pool.

PyTorch's OpenMP threads spin while they wait for each other; on cores that other processes also
want, a spinning thread burns the time slice its partner needs, and a 2-core machine under a load
of 4 ran the quick start 9x slower than idle (docs/benchmarks.md). When other work is running, the
command line therefore uses only the cores left free and lets waiting threads sleep (passive
OpenMP waiting); on an idle machine it changes nothing. OMP_NUM_THREADS or --threads decide instead.
This module imports nothing heavy: it runs before torch is imported.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def runnable_elsewhere() -> int | None:
    """Processes running or ready to run right now besides this one (Linux /proc/loadavg's fourth
    field, an instantaneous count, unlike the load averages), or None where it cannot be read."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None
    return max(0, running - 1)


def command_of(argv: list[str]) -> str | None:
    """The subcommand of a ddimctl command line (the first word that is not an option or its value)."""
    words = iter(argv)
    for word in words:
        if word == "--threads":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


# tune-steps' search compares errors, which the thread count moves: it keeps every core. Training takes
# the free cores like every command (on a busy 2-core CPU, 1.2 steps/s against 0.4 with both), and a
# resume takes the count its run recorded (the weights' bits depend on it: the train command sets it).
FIXED_THREADS = ("tune-steps",)

user_set = False  # whether the user chose the thread count (OMP_NUM_THREADS, or --threads)


def choose(environ: dict = os.environ, command: str | None = None) -> str | None:
    """Set OMP_NUM_THREADS and OMP_WAIT_POLICY for the free cores when other work is running and the
    user set neither; returns what was decided, for a note, or None when nothing changed."""
    global user_set
    user_set = "OMP_NUM_THREADS" in environ
    if user_set or command in FIXED_THREADS:
        return None
    cores, busy = usable_cores(), runnable_elsewhere()
    if busy is None or busy == 0 or cores <= 1:
        return None
    threads = max(1, cores - busy)
    environ["OMP_NUM_THREADS"] = str(threads)
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return (f"{busy} other process(es) are running on the {cores} cores: {threads} thread(s), which sleep while "
            f"they wait (--threads or OMP_NUM_THREADS decide otherwise)")


class Slowdown:
    """Tells when a run's rate falls far below its best so far: other work took the CPU."""

    def __init__(self, window_s: float = 3.0, factor: float = 3.0):
        self.window_s, self.factor = window_s, factor
        self.best = 0.0
        self.mark = None  # (time, done) at the start of the current window

    def update(self, now: float, done: float) -> str:
        """A remark for the progress line ("" while the rate holds)."""
        if self.mark is None:
            self.mark = (now, done)
            return ""
        elapsed = now - self.mark[0]
        if elapsed < self.window_s:
            return ""
        rate = (done - self.mark[1]) / elapsed
        self.mark = (now, done)
        self.best = max(self.best, rate)
        if rate > 0 and self.best > self.factor * rate:
            return (f"{self.best / rate:.0f}x slower than at the start: other work is using the CPU "
                    f"(--threads 1 may help)")
        return ""
