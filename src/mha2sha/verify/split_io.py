"""Whole-model comparison when the converted model's I/O is cut per head (``--per-head-kv-io``).

The feeds of the converted model are the original's with each per-head input cut along its head
axis; its per-head outputs are joined back before comparing (``SplitRecord.input_pieces`` /
``output_pieces``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mha2sha.split.record import SplitRecord
from mha2sha.verify.runner import Verification, compare_outputs, run_model, verify

__all__ = ["per_head_feeds", "per_head_outputs", "verify_whole"]


def per_head_feeds(inputs: Mapping[str, np.ndarray], split: SplitRecord) -> dict[str, np.ndarray]:
    """The converted model's feeds: inputs that became per-head inputs are cut along the head axis."""
    feeds = {k: v for k, v in inputs.items() if k not in split.input_pieces}
    for name, (axis, names) in split.input_pieces.items():
        feeds.update(zip(names, np.split(inputs[name], len(names), axis=axis), strict=True))
    return feeds


def per_head_outputs(outputs: Mapping[str, np.ndarray], split: SplitRecord) -> dict[str, np.ndarray]:
    """Outputs named as the converted model names them (per-head outputs cut along the head axis)."""
    result: dict[str, np.ndarray] = {}
    for name, array in outputs.items():
        if name in split.output_pieces:
            axis, names = split.output_pieces[name]
            result.update(zip(names, np.split(array, len(names), axis=axis), strict=True))
        else:
            result[name] = array
    return result


def verify_whole(
    original: Path, converted: Path, inputs: Mapping[str, np.ndarray], split: SplitRecord, rtol: float
) -> Verification:
    """Compare on the same data; per-head outputs are joined back before comparing."""
    if not (split.input_pieces or split.output_pieces):
        return verify(original, converted, inputs, rtol=rtol)
    reference = run_model(original, inputs)
    got = run_model(converted, per_head_feeds(inputs, split), ours=True)
    for name, (axis, names) in split.output_pieces.items():
        got[name] = np.concatenate([got.pop(n) for n in names], axis=axis)
    return compare_outputs(reference, {k: got[k] for k in reference if k in got} | got, rtol)
