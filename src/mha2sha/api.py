"""The Python API: :func:`convert` (the job, :mod:`mha2sha.job`) and the original tool's
:class:`MHA2SHAConverter` (:mod:`mha2sha.legacy`)."""

from __future__ import annotations

from mha2sha.errors import ConversionFailed, InternalError, UserError
from mha2sha.job import ConversionResult, ConvertOptions, convert
from mha2sha.legacy import MHA2SHAConverter

__all__ = [
    "ConversionFailed",
    "ConversionResult",
    "ConvertOptions",
    "InternalError",
    "MHA2SHAConverter",
    "UserError",
    "convert",
]
