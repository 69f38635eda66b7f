"""mha2sha: split multi-head attention into per-head single-head attention in ONNX models."""

from mha2sha.api import ConversionResult, ConvertOptions, MHA2SHAConverter, convert
from mha2sha.arcl import ArRecord, build_ar
from mha2sha.errors import UserError

__all__ = ["MHA2SHAConverter", "convert", "ConvertOptions", "ConversionResult", "UserError", "build_ar", "ArRecord"]
__version__ = "0.1.0"
