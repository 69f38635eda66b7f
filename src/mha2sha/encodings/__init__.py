"""AIMET quantization encodings: one in-memory model, file formats, and per-head propagation."""

from __future__ import annotations

from mha2sha.encodings.axes import channel_axes, resolve_axes
from mha2sha.encodings.formats import (
    convert_encodings,
    dump_encodings,
    load_encodings,
    parse_encodings,
    save_encodings,
)
from mha2sha.encodings.model import VERSIONS, Encoding, EncodingSet
from mha2sha.encodings.propagate import (
    CoverageReport,
    EncodingCoverageError,
    OutputFacts,
    output_facts,
    pad_encoding,
    propagate,
    slice_encoding,
)
from mha2sha.encodings.requant import RequantRecord, requantize

__all__ = [
    "VERSIONS",
    "CoverageReport",
    "Encoding",
    "EncodingCoverageError",
    "EncodingSet",
    "OutputFacts",
    "channel_axes",
    "convert_encodings",
    "dump_encodings",
    "load_encodings",
    "output_facts",
    "pad_encoding",
    "parse_encodings",
    "propagate",
    "RequantRecord",
    "requantize",
    "resolve_axes",
    "save_encodings",
    "slice_encoding",
]
