"""PerHeadOProjPass: give each head its rows of ``W_o`` and sum, instead of concat + one projection.

After the head split, each attention block ends in ``Concat(head_0 .. head_{H-1}) -> o_proj``.
Two equivalent forms exist for HTP:

(a) **concat then one Conv** (default, what the split emits): one ``[C, H*D]`` Conv;
(b) **per-head Conv + Add tree** (this pass, ``--optimize-o-proj``): head ``h`` multiplies its
    ``[.., D]`` output by rows ``h*D:(h+1)*D`` of ``W_o`` and the ``H`` partial results are summed
    by a balanced tree of ``Add``.

Rules applied:
1. Find a ``Concat`` on the last axis whose every consumer is a ``MatMul`` (constant 2-D weight)
   or ``Gemm`` (``transA=0``, constant ``B``) reading it as its first input, directly or through
   Reshapes that keep the last axis (``[1,S,C] -> [S,C]`` before a Gemm). Several consumers
   happen with an unmerged LoRA on ``o_proj``: its A reads the same heads, so A is cut by the
   same rows (each head's ``[D, r]`` rows, summed) and the Concat goes away.
2. Replace it by one projection per concat input on the matching weight rows (lazy slices of the
   memory-mapped weight, named ``<W>.h<k>``; Gemm keeps ``transB``/``alpha``, and only head 0
   carries ``C``/``beta``) and a balanced Add tree whose last output keeps the projection's name.
3. Record the weight slices in the split's :class:`~mha2sha.split.record.SplitRecord` (so
   per-channel encodings are copied whole: every output channel stays in each slice) and the
   partial sums as ``new_activations`` (their ranges exist in no original tensor: a quantized flow
   must calibrate them).

Why (a) stays the default -- measured with ``python -m tests.layout.bench_o_proj --htp`` (ORT CPU
float32, 2 threads, median of 30, range over 3 runs on a shared 2-core host; QNN 2.7 HTP x86
emulator, SM8650, A16W8 QDQ calibrated on the MatMul form and carried to the Conv form by the
layout record, CPU fallback disabled):

===============  ============  ============  =============  ==================================
heads x dim, S   ORT CPU (a)   ORT CPU (b)   HTP ops (a/b)  QDQ output of (b) vs (a), 16-bit
===============  ============  ============  =============  ==================================
8 x 64, 128      0.24-0.45 ms  0.44-0.55 ms  13 / 33        353 LSB
32 x 128, 128    13-35 ms      62-79 ms      37 / 129       372 LSB
32 x 128, 1      5.5-7.9 ms    7.9-8.9 ms    39 / 162       364 LSB
===============  ============  ============  =============  ==================================

Both forms compile fully on the HTP (no CPU fallback; HTP vs ORT CPU on the same QDQ model:
2 LSB for (a), 4-6 for (b)); the emulator's cycle counts are host time and within 30% of each
other either way, so they decide nothing. (a) is faster on ORT CPU in every run (1.2x to 4.7x),
compiles to 2.5-4x fewer HTP ops, and is numerically the original computation (the Conv form of
(a) matches the MatMul form's QDQ output to 0-1 LSB). (b) quantizes ``H`` partial sums and
``H-2`` inner sums, activations that exist in no AIMET encodings file (they must be calibrated)
and whose rounding adds up to ~370 LSB at the output. On a whole zoo model (Llama-GQA KV step,
split + layout) the prepared HTP graph has 497 ops with (a) and 505 with (b). (b) avoids the
Concat copy and keeps every tensor per head, which is why the original tool offered it; it
stays available behind ``--optimize-o-proj``.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from mha2sha.graph import attr_int, is_op, name_of, static_shape
from mha2sha.layout._graph import GENERATED, Editor
from mha2sha.layout.record import LayoutRecord, Skipped
from mha2sha.split.record import Piece, SplitRecord, TensorSplit

__all__ = ["PerHeadOProjPass"]

logger = logging.getLogger(__name__)


class _RowSlice:
    """A lazy slice of a (memory-mapped) weight, materialised only when the model is saved."""

    def __init__(self, tensor: ir.TensorProtocol, index: tuple[slice, ...]):
        self._tensor = tensor
        self._index = index

    def __call__(self) -> ir.TensorProtocol:
        return ir.tensor(np.ascontiguousarray(self._tensor.numpy()[self._index]))


@dataclasses.dataclass
class _Plan:
    concat: ir.Node
    reshapes: list[ir.Node]  # Reshapes between the Concat and the projection, in order
    proj: ir.Node



class PerHeadOProjPass(ir.passes.InPlacePass):
    """Per-head output projection with an Add tree (option (b), see module docstring)."""

    def __init__(self, record: LayoutRecord | None = None, split_record: SplitRecord | None = None):
        super().__init__()
        self.record = record if record is not None else LayoutRecord()
        self.split_record = split_record

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        plans = [p for n in list(graph) for p in self._plans(n)]
        if not plans:
            return ir.passes.PassResult(model, modified=False)
        editor = Editor(graph)
        weights = [p.proj.inputs[1] for p in plans]
        for plan in plans:
            self._rewrite(graph, editor, plan)
        RemoveUnusedNodesPass()(model)
        for w in weights:
            if w is not None and graph.initializers.get(w.name or "") is w and not w.uses():
                del graph.initializers[name_of(w)]
        TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=True)

    def _skip(self, node: ir.Node, reason: str) -> None:
        self.record.skipped.append(Skipped(node.name or node.outputs[0].name or "", node.op_type, reason))

    def _plans(self, concat: ir.Node) -> list[_Plan]:
        """One plan per consumer of the Concat; none unless every consumer is a projection (the
        Concat only goes away when all of them take their rows per head)."""
        if not is_op(concat, "Concat") or len(concat.inputs) < 2:
            return []
        out = concat.outputs[0]
        shape = static_shape(out)
        if shape is None or any(static_shape(v) is None for v in concat.inputs) or out.is_graph_output():
            return []
        axis = attr_int(concat, "axis", 0) % len(shape)
        plans = []
        for user, index in list(out.uses()):
            reshapes = []
            while (
                user.op_type == "Reshape" and index == 0 and (r_shape := static_shape(user.outputs[0])) is not None
            ):
                value = user.outputs[0]
                uses = list(value.uses())
                if r_shape[-1] != shape[-1] or len(uses) != 1 or value.is_graph_output():
                    return []
                reshapes.append(user)
                user, index = uses[0]
            if not is_op(user, "MatMul", "Gemm") or index != 0:
                return []
            if axis != len(shape) - 1:
                self._skip(user, f"its input is a Concat on axis {axis}, not the contracted last axis")
                return []
            w = user.inputs[1]
            if w is None or w.const_value is None or w.is_graph_input() or len(static_shape(w) or ()) != 2:
                self._skip(user, "weight is not a constant [in, out] matrix")
                return []
            if user.op_type == "Gemm" and attr_int(user, "transA", 0):
                self._skip(user, "Gemm transA=1")
                return []
            plans.append(_Plan(concat, reshapes, user))
        return plans

    def _rewrite(self, graph: ir.Graph, editor: Editor, plan: _Plan) -> None:
        proj, concat = plan.proj, plan.concat
        w = proj.inputs[1]
        assert w is not None and w.const_value is not None and w.name is not None
        trans_b = proj.op_type == "Gemm" and bool(attr_int(proj, "transB", 0))
        in_axis = 1 if trans_b else 0
        out = proj.outputs[0]
        out_shape = static_shape(out)
        assert out_shape is not None and out.name is not None
        split = TensorSplit(w.name, "param", tuple(static_shape(w) or ()), [])
        w_static = static_shape(w)
        assert w_static is not None  # _plan: a constant [in, out] matrix
        partials: list[ir.Value] = []
        offset = 0
        for h, piece in enumerate(concat.inputs):
            assert piece is not None
            piece_shape = static_shape(piece)
            assert piece_shape is not None  # _plan: every Concat input has a static shape
            width = piece_shape[-1]
            current = piece
            for reshape in plan.reshapes:
                reshape_shape = static_shape(reshape.outputs[0])
                assert reshape_shape is not None  # _plan: only statically shaped Reshapes
                target = list(reshape_shape)
                target[-1] = width
                reshaped = editor.value(f"{reshape.outputs[0].name}.h{h}", target, current)
                shape_const = editor.const_i64(target, f"{reshaped.name}.shape")
                graph.insert_before(
                    proj,
                    ir.Node(
                        "",
                        "Reshape",
                        [current, shape_const],
                        outputs=[reshaped],
                        name=editor.unique(f"{reshape.name or 'Reshape'}.h{h}"),
                    ),
                )
                current = reshaped
            index = [slice(None), slice(None)]
            index[in_axis] = slice(offset, offset + width)
            w_shape = list(w_static)
            w_shape[in_axis] = width
            w_h = ir.Value(name=editor.unique(f"{w.name}.h{h}"), shape=ir.Shape(w_shape), type=w.type)
            w_h.const_value = ir.LazyTensor(
                _RowSlice(w.const_value, tuple(index)), w.const_value.dtype, ir.Shape(w_shape), name=w_h.name
            )
            graph.register_initializer(w_h)
            split.pieces.append(Piece(name_of(w_h), ((in_axis, offset, offset + width),), (h,)))
            offset += width
            inputs: list[ir.Value | None] = [current, w_h]
            attrs = [a for a in proj.attributes.values() if a.name != "beta"]
            if proj.op_type == "Gemm" and h == 0 and len(proj.inputs) > 2 and proj.inputs[2] is not None:
                inputs.append(proj.inputs[2])
                attrs = list(proj.attributes.values())
            partial = editor.value(f"{out.name}.h{h}", out_shape, out)
            partial.meta[GENERATED] = False  # new values, not a re-layout of an original
            graph.insert_before(
                proj,
                ir.Node(
                    proj.domain,
                    proj.op_type,
                    inputs,
                    attrs,
                    outputs=[partial],
                    name=editor.unique(f"{proj.name or proj.op_type}.h{h}"),
                    version=proj.version,
                ),
            )
            partials.append(partial)
        total = self._sum_tree(graph, editor, proj, partials, out)
        out.replace_all_uses_with(total, replace_graph_outputs=True)
        name = out.name
        out.name = editor.unique(name + ".concat_proj")
        total.name = name
        total.meta[GENERATED] = bool(out.meta.get(GENERATED))
        self.record.new_activations.extend(name_of(p) for p in partials if p is not total)
        if self.split_record is not None:
            self.split_record.tensors.setdefault(w.name, split)
        self.record.o_proj.append(proj.name or name)

    def _sum_tree(
        self, graph: ir.Graph, editor: Editor, proj: ir.Node, partials: list[ir.Value], like: ir.Value
    ) -> ir.Value:
        """A balanced tree of Adds (depth log2 H, so no long serial chain)."""
        level = list(partials)
        k = 0
        shape = static_shape(like)
        assert shape is not None
        while len(level) > 1:
            nxt = []
            for i in range(0, len(level) - 1, 2):
                total = editor.value(f"{like.name}.sum{k}", shape, like)
                total.meta[GENERATED] = False
                graph.insert_before(
                    proj,
                    ir.Node(
                        "",
                        "Add",
                        [level[i], level[i + 1]],
                        outputs=[total],
                        name=editor.unique(f"{proj.name or 'o_proj'}.sum{k}"),
                    ),
                )
                self.record.new_activations.append(name_of(total))
                k += 1
                nxt.append(total)
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        self.record.new_activations.remove(name_of(level[0]))
        return level[0]
