"""What the head split did to each original tensor: the contract between the split and its consumers.

The encodings propagation, the name map and the report read only these records, never the graph
rewrite itself.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = ["BlockReport", "Piece", "TensorSplit", "SplitRecord"]


@dataclasses.dataclass
class BlockReport:
    """What happened to one attention block: ``split``, ``unsupported`` (left as multi-head, with
    the reason) or ``single-head`` (nothing to split)."""

    name: str
    status: Literal["split", "unsupported", "single-head"]
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    weights: list[str] = dataclasses.field(default_factory=list)
    inputs: list[str] = dataclasses.field(default_factory=list)
    kv_cache: list[str] = dataclasses.field(default_factory=list)  # cache concats cut after appending
    activations: list[str] = dataclasses.field(default_factory=list)  # "tensor (reason)"
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Piece:
    """One per-head tensor cut out of an original tensor.

    ``ranges`` lists ``(axis, start, stop)`` per sliced axis of the *original* tensor: the piece is
    ``original[..., start:stop, ...]`` on each listed axis (all other axes whole). ``head`` is the
    index along the split (query-head index, or KV-head index for tensors shared by a GQA group).
    """

    name: str
    ranges: tuple[tuple[int, int, int], ...]
    head: tuple[int, ...]


@dataclasses.dataclass
class TensorSplit:
    """An original tensor and the per-head tensors that replace it.

    ``kind`` is ``"param"`` for initializers/constants (weights, biases, per-head constants) and
    ``"activation"`` for everything computed or fed at run time.
    """

    original: str
    kind: Literal["param", "activation"]
    shape: tuple[int, ...]
    pieces: list[Piece]


@dataclasses.dataclass
class SplitRecord:
    """All tensor splits of one conversion, keyed by original tensor name."""

    tensors: dict[str, TensorSplit] = dataclasses.field(default_factory=dict)
    # data-movement tensors (Reshape, Expand, (Un)Squeeze, Transpose) the split made vanish, mapped
    # to the tensor they copied: their encodings are their input's (DESIGN: data movement inherits)
    folded: dict[str, str] = dataclasses.field(default_factory=dict)
    # tensors the split made vanish (e.g. the outputs of a packed-QKV Split) that data-movement
    # tensors of the split regions copied: the same values live on there, cut per head
    copied_by: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    # per-head tensor -> the original tensors it stands for, in data-flow order: first the tensor
    # whose op produced it, then data-movement copies of that tensor whose per-head op vanished (a
    # packed-QKV Slice/Split taking the head's rows, a Reshape that is the identity per head, ...)
    originals: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    # data-movement tensor of a split region (Reshape, Transpose, Expand, a Slice/Split whose head
    # piece is its input's, ...) -> the tensor it copies
    copy_of: dict[str, str] = dataclasses.field(default_factory=dict)
    # per-head node -> {input index: the original tensor that input stands for}, recorded only where
    # the per-head input was produced for another original (the first of its ``originals``): the
    # node reads a vanished copy, which may be requantised on its own encoding (encodings stage)
    reads: dict[str, dict[int, str]] = dataclasses.field(default_factory=dict)
    # originals without per-head tensors of their own (vanished data movement) that the encodings
    # stage requantised per head: original -> its per-head requantised tensors
    requantized: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    # one report per attention block found (split or not), and Softmax nodes that are not attention
    blocks: list[BlockReport] = dataclasses.field(default_factory=list)
    other_softmax: list[str] = dataclasses.field(default_factory=list)
    # with per-head KV I/O: original graph input / output -> (head axis, per-head names in order)
    input_pieces: dict[str, tuple[int, list[str]]] = dataclasses.field(default_factory=dict)
    output_pieces: dict[str, tuple[int, list[str]]] = dataclasses.field(default_factory=dict)

    @property
    def split_blocks(self) -> list[BlockReport]:
        return [b for b in self.blocks if b.status == "split"]

    @property
    def unsupported_blocks(self) -> list[BlockReport]:
        return [b for b in self.blocks if b.status == "unsupported"]

    def prune(self, existing: set[str]) -> None:
        """Forget pieces that the cleanup removed (intermediates of collapsed reshape chains)."""
        for name in list(self.tensors):
            split = self.tensors[name]
            split.pieces = [p for p in split.pieces if p.name in existing]
            if not split.pieces:
                del self.tensors[name]
        for piece in [p for p in self.originals if p not in existing]:
            del self.originals[piece]

    def name_map(self) -> dict[str, dict[str, list[str]]]:
        """The ``mha_to_sha_names.json`` content: original name -> per-head names, by kind."""
        out: dict[str, dict[str, list[str]]] = {"activation_encodings": {}, "param_encodings": {}}
        for split in self.tensors.values():
            key = "param_encodings" if split.kind == "param" else "activation_encodings"
            out[key][split.original] = [p.name for p in split.pieces]
        for original, names in self.requantized.items():
            out["activation_encodings"].setdefault(original, list(names))
        return out
