"""Build each head's piece of every tensor the walk recorded, once, with readable names.

Pieces are memoised by (tensor, spec, piece key), so heads that share a piece (a GQA group's key
and value, an ALiBi table used by every layer) share one tensor. New tensors are named after the
original with a head suffix (``/layers.0/attn/q_proj/MatMul_output_0.h3``); weight pieces are
lazy slices of the original (memory-mapped) weight, materialised only when the model is saved.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir

from mha2sha.graph import DATA_MOVEMENT_OPS, name_of
from mha2sha.io.names import UniqueNames
from mha2sha.io.pieces import piece_of
from mha2sha.split.record import Piece, SplitRecord, TensorSplit
from mha2sha.split.rules import rule_of, static_shape
from mha2sha.split.spec import HeadSpec, is_full_cover, piece_key, piece_ranges, piece_shape
from mha2sha.split.walk import Region, Step

__all__ = ["Emitter"]


def _suffix(key: tuple[int, ...]) -> str:
    return ".h" + "_".join(str(k) for k in key)


class Emitter:
    """Creates per-head nodes and values in ``graph`` for the steps of one or more regions."""

    def __init__(self, graph: ir.Graph, record: SplitRecord, *, per_head_inputs: bool = False):
        self.graph = graph
        self.record = record
        self.per_head_inputs = per_head_inputs
        # graph inputs replaced by per-head inputs: original -> (axis, per-head values)
        self.input_pieces: dict[str, tuple[ir.Value, int, list[ir.Value]]] = {}
        self._memo: dict[tuple[int, HeadSpec, tuple[int, ...]], ir.Value] = {}
        self._clones: dict[tuple[int, tuple[int, ...]], ir.Node] = {}
        self.unique = UniqueNames(graph)
        self.new_nodes: list[ir.Node] = []
        self._reshape_sources: dict[int, ir.Value] = {}

    # -- records --------------------------------------------------------------------------------
    def _remember(self, step: Step, head: int, piece: ir.Value) -> None:
        key = piece_key(step.spec, head)
        self._memo[(id(step.value), step.spec, key)] = piece
        name = name_of(step.value)
        split = self.record.tensors.get(name)
        if split is None:
            kind: Literal["param", "activation"] = "param" if step.kind == "param" else "activation"
            split = TensorSplit(name, kind, static_shape(step.value), [])
            self.record.tensors[name] = split
        if all(p.name != piece.name for p in split.pieces):
            split.pieces.append(Piece(name_of(piece), piece_ranges(step.spec, head), key))
        # the producer's original is remembered first (a vanished op's input piece is built, and
        # remembered, before the op's own step), so originals are listed in data-flow order
        originals = self.record.originals.setdefault(name_of(piece), [])
        if name_of(step.value) not in originals:
            originals.append(name_of(step.value))

    def _note_reads(self, node: ir.Node, index: int, piece: ir.Value, original: ir.Value) -> None:
        """``node``'s input ``index`` is ``piece`` standing for ``original``: record it when ``piece``
        was produced for another original (``original`` is a vanished data-movement copy of it)."""
        produced_for = self.record.originals.get(name_of(piece))
        if produced_for and produced_for[0] != original.name:
            self.record.reads.setdefault(node.name or "", {})[index] = name_of(original)

    def _note_copy(self, step: Step, source: ir.Value | None) -> None:
        if source is not None and step.node is not None:
            self.record.copy_of[name_of(step.value)] = source.name or ""

    # -- pieces ---------------------------------------------------------------------------------
    def piece(self, region: Region, value: ir.Value, spec: HeadSpec | None, head: int) -> ir.Value:
        """The piece of ``value`` head ``head`` uses (the value itself when shared)."""
        if not spec:
            return value
        key = piece_key(spec, head)
        memo_key = (id(value), spec, key)
        if memo_key in self._memo:
            return self._memo[memo_key]
        step = region.get(value, spec)
        if step.kind == "param":
            piece = self._param_piece(step, head)
        elif step.kind in ("input", "activation"):
            piece = self._cut_piece(step, head)
        else:
            piece = self._node_piece(region, step, head)
        self._remember(step, head, piece)
        return piece

    def _value_like(self, original: ir.Value, spec: HeadSpec, head: int) -> ir.Value:
        name = self.unique(name_of(original) + _suffix(piece_key(spec, head)))
        shape = ir.Shape(piece_shape(static_shape(original), spec))
        return ir.Value(name=name, shape=shape, type=original.type)

    def _param_piece(self, step: Step, head: int) -> ir.Value:
        tensor = step.value.const_value
        assert tensor is not None
        index = [slice(None)] * len(static_shape(step.value))
        for axis, start, stop in piece_ranges(step.spec, head):
            index[axis] = slice(start, stop)
        value = self._value_like(step.value, step.spec, head)
        assert value.shape is not None  # _value_like gives every piece its shape
        value.const_value = piece_of(tensor, tuple(index), value.shape, value.name or "")
        self.graph.register_initializer(value)
        return value

    def _cut_piece(self, step: Step, head: int) -> ir.Value:
        """Cut a graph input or computed tensor: one Split for a full cover, else one Slice."""
        shape = static_shape(step.value)
        if is_full_cover(step.spec, shape):
            (cut,) = step.spec
            heads_of_piece = [i * cut.div for i in range(cut.count)]  # a head that uses piece i
            outputs = [self._value_like(step.value, step.spec, h) for h in heads_of_piece]
            if step.kind == "input" and self.per_head_inputs:
                position = list(self.graph.inputs).index(step.value) + 1
                for offset, out in enumerate(outputs):
                    self.graph.inputs.insert(position + offset, out)
                self.input_pieces[name_of(step.value)] = (step.value, cut.axis, outputs)
            else:
                sizes = self.const_i64([cut.block] * cut.count, f"{step.value.name}.split_sizes")
                node = ir.Node(
                    "",
                    "Split",
                    [step.value, sizes],
                    [ir.AttrInt64("axis", cut.axis)],
                    outputs=outputs,
                    name=self.unique(f"{step.value.name}.split_heads"),
                )
                self.add(node)
            for h, out in zip(heads_of_piece, outputs, strict=True):
                self._remember(step, h, out)
            return self._memo[(id(step.value), step.spec, piece_key(step.spec, head))]
        ranges = piece_ranges(step.spec, head)
        out = self._value_like(step.value, step.spec, head)
        base = out.name
        node = ir.Node(
            "",
            "Slice",
            [
                step.value,
                self.const_i64([r[1] for r in ranges], f"{base}.starts"),
                self.const_i64([r[2] for r in ranges], f"{base}.ends"),
                self.const_i64([r[0] for r in ranges], f"{base}.axes"),
            ],
            outputs=[out],
            name=self.unique(f"{base}.slice"),
        )
        self.add(node)
        return out

    def _node_piece(self, region: Region, step: Step, head: int) -> ir.Value:
        node = step.node
        assert node is not None
        rule = rule_of(node)
        assert rule is not None
        if rule.identity_when is not None and rule.identity_when(node, step.out_index, step.spec):
            k = next(i for i, s in enumerate(step.in_specs) if s)
            source = node.inputs[k]
            assert source is not None  # the walk cuts only inputs that are present
            self._note_copy(step, source)
            return self.piece(region, source, step.in_specs[k], head)
        inputs = [
            self.piece(region, v, s, head) if v is not None else None
            for v, s in zip(node.inputs, step.in_specs, strict=False)
        ]
        inputs += list(node.inputs[len(inputs) :])
        if node.op_type in DATA_MOVEMENT_OPS or rule.emit in ("reshape", "tile"):
            self._note_copy(step, node.inputs[0])
        if rule.emit in ("reshape", "tile"):
            data = inputs[0]
            assert data is not None  # input 0 of Reshape/Expand/(Un)Squeeze/Flatten/Tile is required
            if rule.emit == "reshape":
                return self._reshape(step, head, data)
            repeats = self._tile_repeats(step, head, data)
            if repeats is None:
                return data
            inputs[1] = repeats
        clone_key = (id(node), tuple(id(v) for v in inputs))
        clone = self._clones.get(clone_key)
        if clone is None:
            outputs = [
                self._value_like(o, step.spec, head)
                if i == step.out_index
                else ir.Value(name=self.unique(name_of(o) + _suffix(piece_key(step.spec, head))), type=o.type)
                for i, o in enumerate(node.outputs)
            ]
            clone = ir.Node(
                node.domain,
                node.op_type,
                inputs,
                list(node.attributes.values()),
                outputs=outputs,
                name=self.unique((node.name or node.op_type) + _suffix(piece_key(step.spec, head))),
                version=node.version,
            )
            self._clones[clone_key] = clone
            self.add(clone)
            for i, (v, s) in enumerate(zip(node.inputs, step.in_specs, strict=False)):
                piece = inputs[i]
                if v is not None and s and piece is not None:
                    self._note_reads(clone, i, piece, v)
        out = clone.outputs[step.out_index]
        if out.shape is None:
            out.shape = ir.Shape(piece_shape(static_shape(node.outputs[step.out_index]), step.spec))
        return out

    def _reshape(self, step: Step, head: int, source: ir.Value) -> ir.Value:
        """Per-head Reshape/Expand/(Un)Squeeze as one Reshape to the piece shape; chains collapse."""
        node = step.node
        assert node is not None
        target = piece_shape(static_shape(step.value), step.spec)
        source = self._reshape_sources.get(id(source), source)  # collapse chains of per-head reshapes
        source_shape = static_shape(source)  # pieces have static shapes; the walk checked shared inputs
        if source_shape == target:
            return source
        if node.op_type == "Expand" and np.prod(target) != np.prod(source_shape):
            op, shape_name = "Expand", "expand_shape"
        else:
            op, shape_name = "Reshape", "shape"
        out = self._value_like(step.value, step.spec, head)
        if op == "Reshape":
            self._reshape_sources[id(out)] = source
        new = ir.Node(
            "",
            op,
            [source, self.const_i64(list(target), f"{out.name}.{shape_name}")],
            outputs=[out],
            name=self.unique((node.name or node.op_type) + _suffix(piece_key(step.spec, head))),
        )
        self.add(new)
        if node.inputs[0] is not None:  # a collapsed chain reads an earlier piece for the op's input
            self._note_reads(new, 0, source, node.inputs[0])
        return out

    def _tile_repeats(self, step: Step, head: int, source: ir.Value) -> ir.Value | None:
        """Tile repeats that turn the head's input piece into its output piece (None: no repeat)."""
        target = piece_shape(static_shape(step.value), step.spec)
        repeats = [t // s for t, s in zip(target, static_shape(source), strict=True)]
        if all(r == 1 for r in repeats):
            return None
        return self.const_i64(repeats, f"{step.value.name}{_suffix(piece_key(step.spec, head))}.repeats")

    # -- helpers --------------------------------------------------------------------------------
    def const_i64(self, values: list[int], name: str) -> ir.Value:
        tensor = ir.tensor(np.asarray(values, dtype=np.int64))
        value = ir.Value(name=self.unique(name), const_value=tensor)
        tensor.name = value.name
        value.shape = ir.Shape([len(values)])
        value.type = ir.TensorType(ir.DataType.INT64)
        self.graph.register_initializer(value)
        return value

    def concat(self, pieces: list[ir.Value], axis: int, like: ir.Value) -> ir.Value:
        """Join pieces back into a tensor shaped like ``like``."""
        out = ir.Value(name=self.unique(name_of(like) + ".concat_heads"), shape=like.shape, type=like.type)
        node = ir.Node("", "Concat", pieces, [ir.AttrInt64("axis", axis)], outputs=[out], name=out.name)
        self.add(node)
        for i, piece in enumerate(pieces):
            self._note_reads(node, i, piece, like)
        return out

    def add(self, node: ir.Node) -> None:
        self.graph.append(node)
        self.new_nodes.append(node)
