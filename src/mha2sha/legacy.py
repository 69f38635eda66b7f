"""The original MHA2SHA tool's interfaces: ``mha2sha-onnx-converter`` and ``MHA2SHAConverter``.

Both translate the old flags with :func:`mha2sha.commands.options.options_from_flags`, the same
translation ``mha2sha convert`` uses, so equal flags give equal conversions (encodings included).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from mha2sha.arcl.build import BuildArOptions, convert_and_build_ar
from mha2sha.commands.build_ar import run_convert_with_ar
from mha2sha.commands.convert import run_conversion
from mha2sha.commands.guard import console, run_guarded
from mha2sha.commands.options import (
    LEGACY_HINTS,
    LEGACY_LATER,
    LEGACY_LAYOUT,
    add_conversion_options,
    options_from_flags,
)
from mha2sha.io.load import load_model
from mha2sha.job import convert

__all__ = ["MHA2SHAConverter", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``mha2sha-onnx-converter``: the original tool's command line (flags are hints)."""
    parser = argparse.ArgumentParser(
        prog="mha2sha-onnx-converter", description="Original MHA2SHA command line (flags are hints)."
    )
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--exported-model-path", required=True)
    parser.add_argument("--sha-export-path", required=True)
    parser.add_argument("--exported-model-encoding-path", help="AIMET .encodings (same as --encodings)")
    parser.add_argument("--no-verification", action="store_true")
    parser.add_argument("--base-llm", help="accepted for compatibility; the model family is detected")
    for dest in LEGACY_HINTS:
        if dest not in ("log_level", "base_llm"):
            parser.add_argument(
                "--" + dest.replace("_", "-"),
                action="store_true",
                help="accepted for compatibility; detected automatically",
            )
    for dest in LEGACY_LATER:
        parser.add_argument("--" + dest.replace("_", "-"), nargs="?", const=True, default=None, help="not available yet")
    parser.add_argument(
        "--build-ar",
        metavar="N[,M]",
        help="then rewrite the converted graph for N tokens per step (ARN; one graph per AR, shared "
        "weights), proven by the token loop: writes <name>_ar<N>_cl<CL>.onnx",
    )
    for dest in LEGACY_LAYOUT:
        if dest != "replace_linear_with_conv":  # a modern flag too
            parser.add_argument("--" + dest.replace("_", "-"), action="store_true", help="same as --target htp")
    add_conversion_options(parser)
    args = parser.parse_args(argv)

    def action(timer: Any) -> int:
        options = options_from_flags(vars(args))
        if args.build_ar is not None:
            ar_options = BuildArOptions(verify="none" if options.verify == "none" else "auto")
            return run_convert_with_ar(
                args.exported_model_path, args.sha_export_path, args.model_name, options, args.build_ar, None,
                ar_options, console, timer,
            )  # fmt: skip
        return run_conversion(
            args.exported_model_path, args.sha_export_path, args.model_name, options, console, timer
        )

    return run_guarded(action, args.log_level)


class MHA2SHAConverter:
    """Python API of the original tool: ``MHA2SHAConverter(name, export_path, model, **flags).convert()``.

    ``flags`` are the original tool's (``exported_model_encoding_path=``, ``mha_conv=True``,
    ``no_verification=True``, ``create_input_lists=True``, ...) or this tool's option names;
    the split needs none of them (it finds every attention block and its layout by itself).
    Returns ``(model, verification_status)`` where the model is the converted ``onnx_ir.Model``
    and the status is True, False, or None when verification was off.
    """

    def __init__(
        self,
        model_name: str,
        sha_export_path: str | os.PathLike,
        model_or_path: str | os.PathLike | onnx.ModelProto,
        **flags: Any,
    ):
        self.model_name = model_name
        self.sha_export_path = Path(sha_export_path)
        self.model_or_path = model_or_path
        self.flags = flags

    def convert(self) -> tuple[ir.Model, bool | None]:
        if isinstance(self.model_or_path, onnx.ModelProto):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{self.model_name}.onnx"
                onnx.save(
                    self.model_or_path, path, save_as_external_data=self.model_or_path.ByteSize() > (1 << 30)
                )
                return self._convert(path)
        return self._convert(Path(self.model_or_path))

    def _convert(self, path: Path) -> tuple[ir.Model, bool | None]:
        flags = {k: v for k, v in self.flags.items() if k != "build_ar"}
        options = options_from_flags(flags)
        if self.flags.get("build_ar") not in (None, False):
            # the original tool's ARN build: the converted graph for AR N (first of N,M), proven
            ars = str(self.flags["build_ar"])
            ar_options = BuildArOptions(verify="none" if options.verify == "none" else "auto")
            result, record = convert_and_build_ar(
                path, self.sha_export_path, ars, None, name=self.model_name, convert_options=options,
                options=ar_options,
            )  # fmt: skip
            if record is None:
                return result.model, False
            status = None if record.verify_mode in ("none", "skipped") else record.ok
            if status is not None and result.verification is not None:
                status = status and result.verification.ok
            return load_model(record.variants[0].path), status
        result = convert(path, self.sha_export_path, name=self.model_name, options=options)
        status = None if result.verification is None else result.verification.ok
        return result.model, status
