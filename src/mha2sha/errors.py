"""The three ways a job ends other than success, each with its exit code.

- :class:`UserError` (2): bad input or environment, one line, nothing written, input untouched.
- :class:`ConversionFailed` (1): the job ran but its result is not acceptable (verification failed,
  attention left multi-head); nothing written unless the user allowed a partial result.
- :class:`InternalError` (3): our own failure (onnxruntime rejects a model *we* wrote, a check of
  ours breaks). Never reported as the user's bad input. Any other exception is treated the same
  way by the CLI: one line naming the stage, the traceback in a log file.
"""

from __future__ import annotations

__all__ = ["ConversionFailed", "InternalError", "UserError"]


class UserError(Exception):
    """Bad input or environment: reported as a single line, exit code 2, nothing written."""

    exit_code = 2


class ConversionFailed(Exception):
    """The conversion ran but its result is not acceptable (verification failed). Exit code 1.

    ``record``: what the failed stage found up to the failure (e.g. the verify stage's record), so
    the job can keep a report of where it failed.
    """

    exit_code = 1

    def __init__(self, message: str = "", *, record: object = None):
        super().__init__(message)
        self.record = record


class InternalError(Exception):
    """A bug of ours, detected (e.g. onnxruntime cannot run the converted model). Exit code 3."""

    exit_code = 3
