"""Phase timing and progress: a bar per phase (and per attention block) on a terminal, and a
time/memory summary for every run."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import sys
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["PhaseTimer", "PhaseRecord", "Advance"]


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 1024 if sys.platform != "darwin" else peak / (1024 * 1024)


def _reset_peak_rss() -> bool:
    """Restart this process's VmHWM (Linux ``clear_refs`` 5); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Advance:
    """Moves a phase's bar: ``advance(n)`` by n steps, ``advance.to(done, total)`` to a position."""

    def __init__(self, bar: Progress | None, task: TaskID | None):
        self._bar, self._task = bar, task

    def __call__(self, n: int = 1) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task, n)

    def to(self, done: int, total: int | None) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done, total=total)


@dataclasses.dataclass
class PhaseRecord:
    name: str
    seconds: float
    peak_rss_mb: float  # the process's peak so far
    phase_peak_rss_mb: float | None = None  # the peak during this phase (MHA2SHA_PHASE_PEAKS=1)


class PhaseTimer:
    """Times named phases; shows a transient progress bar when ``show`` and stderr is a terminal."""

    def __init__(self, show: bool = False):
        self.records: list[PhaseRecord] = []
        self.current: str | None = None  # the phase running now (named in internal-error messages)
        # Per-phase peaks restart the kernel's VmHWM at each phase, so whoever reads VmHWM at exit
        # sees only the last phase's: on request only (benchmarks/run.py), never by default.
        self._phase_peaks = os.environ.get("MHA2SHA_PHASE_PEAKS") == "1"
        self._peak = 0.0
        console = Console(stderr=True)
        self._bar = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            if show and console.is_terminal
            else None
        )

    @contextlib.contextmanager
    def phase(self, name: str, total: int | None = None) -> Iterator[Advance]:
        """Time ``name``; the yielded :class:`Advance` moves its bar (e.g. one step per block)."""
        start = time.perf_counter()
        outer, self.current = self.current, name
        reset = self._phase_peaks and outer is None
        if reset:
            self._peak = max(self._peak, _peak_rss_mb())
            reset = _reset_peak_rss()
        task = None
        if self._bar is not None:
            if not self._bar.live.is_started:
                self._bar.start()
            task = self._bar.add_task(name, total=total)
        try:
            yield Advance(self._bar, task)
        except BaseException:
            raise  # self.current keeps naming the failed phase
        else:
            self.current = outer
        finally:
            if task is not None and self._bar is not None:
                self._bar.remove_task(task)
            peak = _peak_rss_mb()
            self._peak = max(self._peak, peak)
            self.records.append(
                PhaseRecord(name, time.perf_counter() - start, self._peak, peak if reset else None)
            )

    def close(self) -> None:
        if self._bar is not None and self._bar.live.is_started:
            self._bar.stop()

    def table(self) -> Table:
        table = Table(title="Time and memory", title_justify="left")
        table.add_column("phase")
        table.add_column("seconds", justify="right")
        per_phase = any(r.phase_peak_rss_mb is not None for r in self.records)
        table.add_column("peak RSS in phase (MB)" if per_phase else "peak RSS (MB)", justify="right")
        for r in self.records:
            peak = r.phase_peak_rss_mb if r.phase_peak_rss_mb is not None else r.peak_rss_mb
            table.add_row(r.name, f"{r.seconds:.2f}", f"{peak:.0f}")
        table.add_row(
            "total",
            f"{sum(r.seconds for r in self.records):.2f}",
            f"{max((r.peak_rss_mb for r in self.records), default=0):.0f}",
        )
        return table
