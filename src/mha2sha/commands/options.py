"""The conversion options: one set of command-line flags and ONE translation into ConvertOptions.

``mha2sha convert``, the original tool's ``mha2sha-onnx-converter`` and its Python API
``MHA2SHAConverter(**flags)`` all go through :func:`options_from_flags`, so the same flags give the
same conversion whichever door they came in by. Flags are keyed by their argparse destination
(``--input-shape`` -> ``input_shape``); the original tool's spellings are understood too.
Defaults are read from their owners (ConvertOptions, the HTP and encodings modules), never copied.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import Any

from mha2sha.encodings.model import VERSIONS
from mha2sha.errors import UserError
from mha2sha.io.save import parse_size
from mha2sha.io.shapes import ShapeRoles
from mha2sha.job import ConvertOptions
from mha2sha.verify.inputs import parse_input_shapes

__all__ = [
    "LEGACY_HINTS",
    "LEGACY_LATER",
    "LEGACY_LAYOUT",
    "add_conversion_options",
    "add_shape_options",
    "options_from_flags",
    "shape_roles_from_flags",
]

#: Flags of the original tool that the automatic split makes unnecessary: accepted, no effect.
LEGACY_HINTS = (
    "handle_rope_ops", "handle_past_key_value", "gqa_model", "llm_model", "prepared_model",
    "disable_auto_attn_finder", "handle_alibi", "lora_model", "strict", "base_llm", "log_level",
)  # fmt: skip
#: Flags of the original tool for conv-based graphs: the HTP layout covers them.
LEGACY_LAYOUT = ("mha_conv", "nchw_aligned", "replace_linear_with_conv")
#: Flags of the original tool that later releases implement; until then they are refused clearly.
#: (``--build-ar N`` and ``--lora-adaptor-list Y`` are implemented: none is left.)
LEGACY_LATER: tuple[str, ...] = ()

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ConvertOptions)}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def add_shape_options(parser: argparse.ArgumentParser) -> None:
    """``--input-shape`` and the role sizes (``--seq-len``, ``--past-len``, ...) of dynamic dims."""
    parser.add_argument(
        "--input-shape", action="append", default=[], metavar="NAME=D0,D1,...", help="fix a dynamic input shape"
    )
    for role, flag, what in (
        ("seq", "--seq-len", "new tokens per step (sequence_length dims)"),
        ("past", "--past-len", "cached tokens (past_sequence_length dims; total = past + seq)"),
        ("batch", "--batch-size", "batch (batch_size dims; default: suggested 1)"),
        ("encoder_seq", "--encoder-seq-len", "encoder_sequence_length dims (cross-attention)"),
    ):
        parser.add_argument(flag, dest=f"{role}_len" if role != "batch" else "batch_size", type=int,
                            metavar="N", help=f"size of dynamic dims: {what}")  # fmt: skip


def shape_roles_from_flags(flags: Mapping[str, Any]) -> ShapeRoles:
    return ShapeRoles(
        batch=flags.get("batch_size"),
        seq=flags.get("seq_len"),
        past=flags.get("past_len"),
        encoder_seq=flags.get("encoder_seq_len"),
    )


def add_conversion_options(parser: argparse.ArgumentParser) -> None:
    """Options every conversion front-end shares (``convert`` and the original tool's CLI)."""
    parser.add_argument(
        "--target", choices=["generic", "htp"], default="generic", help="htp: Conv 1x1 projections, clean layout"
    )
    parser.add_argument(
        "--replace-linear-with-conv", action="store_true", help="projections as Conv 1x1 on [B,C,1,S] (in --target htp)"
    )
    parser.add_argument(
        "--no-split",
        action="store_true",
        help="only the layout passes (with --replace-linear-with-conv / --target htp): heads stay as they are",
    )
    parser.add_argument(
        "--optimize-o-proj", action="store_true", help="per-head o_proj slices summed (measured slower; off in htp)"
    )
    add_shape_options(parser)
    parser.add_argument("--inputs", metavar="NPZ", help="verify on these inputs (.npz keyed by input name)")
    parser.add_argument(
        "--allow-partial", action="store_true", help="exit 0 even if some attention blocks stay multi-head"
    )
    parser.add_argument("--force", action="store_true", help="write the model even when it has no attention to split")
    parser.add_argument(
        "--create-input-lists", action="store_true", help="write raw inputs, input_list.txt and goldens"
    )
    parser.add_argument("--encodings", metavar="FILE", help="AIMET .encodings of the model: propagated per head")
    parser.add_argument(
        "--lora-adaptor-list",
        metavar="YAML",
        help="LoRA adapters (safetensors + encodings) of the graph's LoRA tensors: each split like the graph",
    )
    parser.add_argument(
        "--lora-alpha-from-input",
        action="store_true",
        help="the LoRA scale (alpha / r) becomes graph input lora_alpha, fed per adapter",
    )
    parser.add_argument("--encodings-version", choices=list(VERSIONS), help="write this encodings version")
    parser.add_argument("--strict-encodings", action="store_true", help="any encodings coverage gap is an error")
    parser.add_argument(
        "--max-lsb",
        type=float,
        default=_DEFAULTS["max_lsb"],
        help=f"quantized outputs may differ by this many LSBs (default {_DEFAULTS['max_lsb']:g})",
    )
    parser.add_argument(
        "--verify-htp", action="store_true", help="also compare on the HTP emulator (needs mha2sha[htp])"
    )
    parser.add_argument(
        "--soc", default=_DEFAULTS["soc"], help=f"HTP SoC model for --verify-htp (default {_DEFAULTS['soc']})"
    )
    parser.add_argument(
        "--per-head-kv-io",
        action="store_true",
        help="one past/present KV input/output per head (default: keep the model's I/O contract)",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"], type=str.lower
    )


def options_from_flags(flags: Mapping[str, Any]) -> ConvertOptions:
    """ConvertOptions from flags by argparse destination, in this tool's or the original's spelling.

    ``verify``: ``--verify MODE``, ``--no-verify`` or the original ``--no-verification``.
    ``encodings``: ``--encodings`` or the original ``--exported-model-encoding-path``.
    ``htp_layout``: ``--target htp`` or any of :data:`LEGACY_LAYOUT`.
    """
    later = [_flag(f) for f in LEGACY_LATER if flags.get(f) not in (None, False)]
    if later:
        raise UserError(
            f"{', '.join(later)} not supported yet by this release"
        )
    verify = flags.get("verify", _DEFAULTS["verify"])
    if flags.get("no_verify") or flags.get("no_verification"):
        verify = "none"
    shard = flags.get("shard_size")
    return ConvertOptions(
        input_shapes=parse_input_shapes(flags.get("input_shape") or []),
        shape_roles=shape_roles_from_flags(flags),
        inputs=flags.get("inputs"),
        verify=verify,
        rtol=flags.get("rtol", _DEFAULTS["rtol"]),
        allow_partial=bool(flags.get("allow_partial", False)),
        force=bool(flags.get("force", False)),
        split_heads=not flags.get("no_split", False),
        create_input_lists=bool(flags.get("create_input_lists", False)),
        per_head_kv_io=bool(flags.get("per_head_kv_io", False)),
        encodings=flags.get("encodings") or flags.get("exported_model_encoding_path"),
        encodings_version=flags.get("encodings_version"),
        strict_encodings=bool(flags.get("strict_encodings", False)),
        htp_layout=flags.get("target") == "htp" or any(flags.get(f) for f in LEGACY_LAYOUT),
        optimize_o_proj=bool(flags.get("optimize_o_proj", False)),
        verify_htp=bool(flags.get("verify_htp", False)),
        max_lsb=flags.get("max_lsb", _DEFAULTS["max_lsb"]),
        soc=flags.get("soc", _DEFAULTS["soc"]),
        shard_bytes=parse_size(shard) if shard is not None else None,
        lora_adaptor_list=flags.get("lora_adaptor_list"),
        lora_alpha_from_input=bool(flags.get("lora_alpha_from_input", False)),
    )
