"""Every adapter proven on the converted graph: the MHA graph with the adapter's weights against the
SHA graph with the adapter's split weights, float and quantized, exactly as the base conversion.

Both graphs are loaded (weights memory-mapped) and the adapter's tensors put in place of the graph's
by name, in memory: the base graph gets the adapter's tensors at the graph's rank, the SHA graph the
pieces the adapters stage cut (:class:`~mha2sha.adapters.record.AdapterResult`); LoRA tensors that
are graph inputs are fed instead. With ``--lora-alpha-from-input`` the base graph gets the same
``lora_alpha`` input (every LoRA scale constant replaced by it, nothing else) and both are fed the
adapter's scale, so each adapter is checked at its own scale.

- float: whole models (``verify full``) or block by block, as the plan decided for the base, at the
  same ``rtol``;
- quantized (when the adapter has encodings and whole-model runs fit): QDQ of both on ORT CPU with
  the adapter's encodings of each graph, within ``--max-lsb``; outputs further apart are decided
  tensor by tensor (:mod:`.qdq_local`), as for the base.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import tempfile
from collections import ChainMap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from mha2sha.adapters.alpha import lora_alpha_to_input
from mha2sha.adapters.lora import find_lora
from mha2sha.adapters.record import AdapterResult, AdaptersRecord
from mha2sha.adapters.weights import overlay
from mha2sha.encodings import EncodingSet
from mha2sha.errors import ConversionFailed
from mha2sha.graph import is_op
from mha2sha.io.load import fix_input_shapes, load_model
from mha2sha.io.save import save_model
from mha2sha.layout.record import LayoutRecord
from mha2sha.split.record import SplitRecord
from mha2sha.verify.blocks import verify_blocks
from mha2sha.verify.qdq import run_qdq_compare
from mha2sha.verify.qdq_local import LocalCheck, compare_quantized_tensors, origins
from mha2sha.verify.runner import Verification
from mha2sha.verify.split_io import verify_whole

__all__ = ["AdapterCheck", "verify_adapters"]

Phase = Callable[..., Any]


@dataclasses.dataclass
class AdapterCheck:
    """What verification proved for one adapter."""

    name: str
    float: Verification
    mode: str  # "full" / "blocks"
    # builtins.float: the field above shadows ``float`` in this class body
    qdq_lsb: dict[str, builtins.float] | None = None  # max |MHA-QDQ - SHA-QDQ| per output, in LSBs
    qdq_local: LocalCheck | None = None  # tensor by tensor, when outputs differ by more than the bound
    note: str = ""  # why the quantized check did not run

    @property
    def max_lsb(self) -> builtins.float | None:
        return max(self.qdq_lsb.values(), default=0.0) if self.qdq_lsb is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.name,
            "float_ok": self.float.ok,
            "mode": self.mode,
            "max_rel_err": self.float.max_rel_err,
            "rtol": self.float.rtol,
            "quantized_max_lsb": self.qdq_lsb,
            "quantized_tensor_by_tensor": self.qdq_local.to_dict() if self.qdq_local else None,
            "note": self.note or None,
        }


def _put(model: ir.Model, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Replace initializers (and Constant outputs) named in ``values``; the graph inputs among them
    are returned as feeds."""
    feeds: dict[str, np.ndarray] = {}
    graph = model.graph
    inputs = {v.name for v in graph.inputs}
    constants = {n.outputs[0].name: n for n in graph if is_op(n, "Constant") and n.outputs}
    for name, array in values.items():
        if name in inputs:
            feeds[name] = array
        elif name in graph.initializers:
            graph.initializers[name].const_value = ir.tensor(array, name=name)
        elif name in constants:
            constants[name].attributes["value"] = ir.AttrTensor("value", ir.tensor(array, name=name))
    return feeds


def _models(
    original: Path, converted: Path, record: AdaptersRecord, result: AdapterResult, shapes: Mapping[str, Any]
) -> tuple[ir.Model, ir.Model, dict[str, np.ndarray]]:
    mha = load_model(original)
    fix_input_shapes(mha, shapes)
    feeds = _put(mha, result.mha_tensors)
    if record.alpha is not None and result.scale is not None:
        lora_alpha_to_input(mha, find_lora(mha, record.lora_tensors))
        feeds[record.alpha.input] = record.alpha.feed(result.scale)
    sha = load_model(converted)
    feeds.update(_put(sha, result.tensors))
    return mha, sha, feeds


def _saved(mha: ir.Model, sha: ir.Model, folder: Path) -> tuple[Path, Path]:
    """Both models written to ``folder`` (weights embedded or beside them): what onnxruntime loads."""
    paths = folder / "mha.onnx", folder / "sha.onnx"
    save_model(mha, paths[0])
    save_model(sha, paths[1])
    return paths


def verify_adapters(
    record: AdaptersRecord,
    original: Path,
    converted: Path,
    split: SplitRecord,
    layout: LayoutRecord | None,
    base: EncodingSet | None = None,
    *,
    inputs: Mapping[str, np.ndarray],
    mode: str,
    whole_model_runs: bool,
    rtol: float,
    max_lsb: float,
    seed: int = 0,
    input_shapes: Mapping[str, Any] | None = None,
    phase: Phase | None = None,
) -> list[AdapterCheck]:
    """One check per adapter; raises ConversionFailed naming the adapter on the first that fails.

    ``base`` are the SHA graph's own encodings: each adapter's (its own propagated) take their place
    by name, as the adapter's take the base graph's on the MHA side."""
    checks = []
    for result in record.adapters:
        mha, sha, feeds = _models(original, converted, record, result, input_shapes or {})
        given: Mapping[str, np.ndarray] = ChainMap(feeds, inputs)  # type: ignore[arg-type]
        quantized = result.mha_encodings is not None and result.encodings is not None and whole_model_runs
        with (
            phase(f"verify adapter {result.name}") if phase is not None else contextlib.nullcontext(),
            tempfile.TemporaryDirectory(prefix="mha2sha-adapter-") as tmp,
        ):
            paths = _saved(mha, sha, Path(tmp)) if mode == "full" or quantized else None
            if paths is None:
                verification = verify_blocks(
                    mha, sha, inputs=given, rtol=rtol, seed=seed,
                    input_pieces=split.input_pieces, output_pieces=split.output_pieces,
                )  # fmt: skip
            else:
                verification = verify_whole(paths[0], paths[1], dict(given), split, rtol)
            check = AdapterCheck(result.name, verification, mode if paths is None else "full")
            if not check.float.ok:
                bad = max((r for r in check.float.rows if not r.ok), key=lambda r: r.max_rel_err)
                raise ConversionFailed(
                    f"adapter {result.name!r}: verification failed: output '{bad.name}' differs (max rel err "
                    f"{bad.max_rel_err:.3g}) {bad.note}; nothing was written"
                )
            if result.mha_encodings is None or result.encodings is None:
                check.note = "no encodings"
            elif paths is None:
                check.note = "quantized check skipped: it runs whole models (too large here)"
            else:
                sha_encodings = overlay(base, result.encodings)
                _quantized(check, paths, result, sha_encodings, dict(given), split, layout, max_lsb)
        checks.append(check)
    return checks


def _quantized(
    check: AdapterCheck,
    paths: tuple[Path, Path],
    result: AdapterResult,
    sha_encodings: EncodingSet,
    feeds: dict[str, np.ndarray],
    split: SplitRecord,
    layout: LayoutRecord | None,
    max_lsb: float,
) -> None:
    assert result.mha_encodings is not None
    mha, sha = paths
    check.qdq_lsb = run_qdq_compare(mha, result.mha_encodings, sha, sha_encodings, feeds)
    worst_name, worst = max(check.qdq_lsb.items(), key=lambda kv: kv[1], default=("", 0.0))
    if worst <= max_lsb:
        return
    check.qdq_local = compare_quantized_tensors(
        mha, result.mha_encodings, sha, sha_encodings, feeds, origins(split, layout)
    )
    bad = check.qdq_local.first_above(max_lsb)
    if bad is not None or not check.qdq_local.tensors:
        what = f"'{bad.name}' differs by {bad.lsb:.3g} LSB given the same quantized inputs" if bad else (
            f"output '{worst_name}' differs by {worst:.3g} LSB and no quantized tensor could be compared alone"
        )
        raise ConversionFailed(
            f"adapter {result.name!r}: quantized verification failed: {what} (> {max_lsb:g}); nothing was written"
        )

