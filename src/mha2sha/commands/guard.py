"""Run a command under the exit-code contract of :mod:`mha2sha.cli`: one line per failure,
never a traceback on the terminal, signals unwind (so staging folders are removed), our own bugs
logged to a file and named as such."""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from rich.console import Console

from mha2sha.errors import ConversionFailed, InternalError, UserError
from mha2sha.report.progress import PhaseTimer

__all__ = ["Interrupted", "console", "run_guarded"]

#: Piped output is read by scripts: never wrap a table or cut a file name there.
console = Console(stderr=False, width=None if sys.stdout.isatty() else 100_000)


class Interrupted(BaseException):
    """A termination signal arrived: unwind (staging folders are removed on the way), exit 128+n."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _error(message: object) -> None:
    """Errors are one plain line (never wrapped, never a traceback): scripts grep them."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)


@contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C does, so every ``finally`` cleans up."""

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with suppress(ValueError, OSError):  # not the main thread: signals stay as they are
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _internal_error(exc: BaseException, stage: str | None) -> int:
    """One line naming the stage; the traceback goes to a log file (a bug report, not noise)."""
    fd, log = tempfile.mkstemp(prefix=f"mha2sha-error-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(f"mha2sha {' '.join(sys.argv[1:])}\nstage: {stage or '-'}\n\n")
        f.write("".join(traceback.format_exception(exc)))
    where = f" in stage '{stage}'" if stage else ""
    _error(f"internal error{where}: {type(exc).__name__}: {exc} (a bug of mha2sha; traceback in {log})")
    return InternalError.exit_code


def run_guarded(action: Callable[[PhaseTimer], int], log_level: str = "warning") -> int:
    """Run ``action`` with the exit-code contract of the module docstring."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    timer = PhaseTimer(show=True)
    try:
        with _signals_raise():
            return action(timer)
    except (UserError, ConversionFailed) as e:
        _error(e)
        return e.exit_code
    except KeyboardInterrupt:
        _error("interrupted (SIGINT); nothing written")
        return 128 + signal.SIGINT
    except Interrupted as e:
        _error(f"interrupted ({signal.Signals(e.signum).name}); nothing written")
        return 128 + e.signum
    except InternalError as e:
        return _internal_error(e, timer.current)
    except Exception as e:  # anything else is our bug too
        return _internal_error(e, timer.current)
    finally:
        timer.close()
