"""LowerRankPass: take size-1 axes out of tensors of rank > 4 (the HTP's limit).

What the split leaves above rank 4 are views with unit axes: HF's mask construction gathers a
``[S, 1]`` column with ``[1, 1, 1, S]`` indices into ``[1, 1, 1, S, 1]`` (then reshapes it to 4-D),
the dynamo exporter indexes the mask with a ``[1, 1, 1, S, 2]`` GatherND index constant, and Bloom's
per-head packed q|k|v is viewed as ``[B, S, 1, 3, D]`` before three Gathers pick q, k and v. The
values are fine; only the unit axes are in the way. Rules, applied to every tensor of rank > 4 whose
shape without its unit axes has rank <= 4:

1. **Reshape** producing it: reshape straight to the shape without unit axes; a **Concat** (on a
   kept axis) producing it, when each of its inputs can be produced without the same axes (Bloom's
   re-joined q|k|v heads ``[B, S, H, 3, D]`` with ``B = 1``, built from per-head Reshapes).
2. **Gather** producing it: its data (and indices) are reshaped without their unit axes first (the
   gathered axis stays), so the Gather itself produces the shape without unit axes.
3. **GatherND** with a constant index tensor of rank > 4 (``batch_dims == 0``): a Gather on the data
   with its indexed leading axes flattened, using the linear indices (same output, rank-4 index).

Rules 1-2 change the tensor's shape, so they apply only when every reader accepts the squeezed
tensor: a Reshape to a static target without ``0`` entries, or a Gather with a scalar index on an
axis that is kept (renumbered; its output loses the same unit axes, and if that output had other
readers it is reshaped back to its old shape). Tensor names and values never change, so encodings
(per-tensor on these data-movement tensors) stay valid. Graph inputs and outputs are left as they
are and stay listed by :func:`~mha2sha.layout.rank.high_rank_tensors`.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from mha2sha.graph import attr_int, const_array, is_onnx_domain, is_op, static_shape
from mha2sha.layout._graph import Editor
from mha2sha.layout.record import LayoutRecord

__all__ = ["LowerRankPass"]

logger = logging.getLogger(__name__)

MAX_RANK = 4



def _squeezed(shape: tuple[int, ...], keep: int | None = None) -> tuple[int, ...]:
    return tuple(d for i, d in enumerate(shape) if d != 1 or i == keep)


class LowerRankPass(ir.passes.InPlacePass):
    """Rewrite unit-axis views of rank > 4 into rank <= 4 (see the module docstring)."""

    def __init__(self, record: LayoutRecord | None = None) -> None:
        super().__init__()
        self.record = record if record is not None else LayoutRecord()
        # record.rank_lowered: names of tensors (or index constants) brought to rank <= 4

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        edit = Editor(graph)
        modified = False
        for node in list(graph):
            if node.graph is not graph or len(node.outputs) != 1:
                continue
            if is_op(node, "GatherND"):
                modified |= self._gather_nd(node, edit)
                continue
            out = node.outputs[0]
            shape = static_shape(out)
            if shape is None or len(shape) <= MAX_RANK or out.is_graph_output():
                continue
            units = frozenset(i for i, d in enumerate(shape) if d == 1)
            if len(shape) - len(units) > MAX_RANK or not self._readers_accept(out, shape, units, via=None):
                continue
            if is_op(node, "Gather"):
                if not self._squeeze_gather_inputs(node, edit, shape, _squeezed(shape)):
                    continue
                self._squeeze_readers(out, shape, units, edit)
            elif self._producible(out, units):
                self._squeeze(out, units, edit)
            else:
                continue
            self.record.rank_lowered.append(out.name or "")
            modified = True
        if modified:
            logger.info("rank lowered to <= %d: %s", MAX_RANK, ", ".join(self.record.rank_lowered))
        return ir.passes.PassResult(model, modified)

    def _producible(self, value: ir.Value, axes: frozenset[int]) -> bool:
        """Whether ``value``'s producer can write it without ``axes`` (all of size 1)."""
        node = value.producer()
        if node is None or not is_onnx_domain(node.domain) or len(node.outputs) != 1:
            return False
        if node.op_type == "Reshape":
            return True
        if node.op_type == "Concat":
            shape = static_shape(value)
            assert shape is not None
            axis = attr_int(node, "axis", 0) % len(shape)
            return axis not in axes and all(
                i is not None
                and not i.is_graph_input()
                and not i.is_graph_output()
                and (i_shape := static_shape(i)) is not None
                and self._readers_accept(i, i_shape, axes, via=node)
                and self._producible(i, axes)
                for i in node.inputs
            )
        return False

    def _squeeze(self, value: ir.Value, axes: frozenset[int], edit: Editor) -> None:
        """Produce ``value`` without ``axes`` (checked by :meth:`_producible`), readers included."""
        shape = static_shape(value)
        assert shape is not None
        node = value.producer()
        assert node is not None
        target = tuple(d for i, d in enumerate(shape) if i not in axes)
        if node.op_type == "Reshape":
            node.replace_input_with(1, edit.const_i64(target, f"{value.name}.shape"))
        else:  # Concat
            axis = attr_int(node, "axis", 0) % len(shape)
            for i in node.inputs:
                if i is not None and (i_shape := static_shape(i)) is not None and len(i_shape) == len(shape):
                    self._squeeze(i, axes, edit)
            node.attributes["axis"] = ir.AttrInt64("axis", axis - sum(1 for a in axes if a < axis))
        self._squeeze_readers(value, shape, axes, edit)

    def _squeeze_readers(
        self, value: ir.Value, shape: tuple[int, ...], axes: frozenset[int], edit: Editor
    ) -> None:
        value.shape = ir.Shape([d for i, d in enumerate(shape) if i not in axes])
        for user, _ in list(value.uses()):
            if user.op_type == "Gather":
                self._renumber_gather(user, shape, axes, edit)

    def _readers_accept(
        self, value: ir.Value, shape: tuple[int, ...], axes: frozenset[int], via: ir.Node | None
    ) -> bool:
        return not value.is_graph_output() and all(
            user is via or self._accepts(user, idx, shape, axes) for user, idx in value.uses()
        )

    @staticmethod
    def _accepts(user: ir.Node, index: int, shape: tuple[int, ...], axes: frozenset[int]) -> bool:
        """Whether ``user`` computes the same when input ``index`` loses ``axes`` (all of size 1)."""
        if not is_onnx_domain(user.domain):
            return False
        if user.op_type == "Reshape" and index == 0:
            target = const_array(user.inputs[1])
            return target is not None and not (0 in target.tolist() and attr_int(user, "allowzero", 0) == 0)
        if user.op_type == "Gather" and index == 0:
            indices = const_array(user.inputs[1])
            axis = attr_int(user, "axis", 0) % len(shape)
            kept = indices is not None and indices.ndim == 0 and axis not in axes
            return kept and not user.outputs[0].is_graph_output()
        return False

    @staticmethod
    def _renumber_gather(user: ir.Node, shape: tuple[int, ...], axes: frozenset[int], edit: Editor) -> None:
        """A scalar-index Gather reading the squeezed tensor: renumber its axis, fix its output."""
        axis = attr_int(user, "axis", 0) % len(shape)
        user.attributes["axis"] = ir.AttrInt64("axis", axis - sum(1 for a in axes if a < axis))
        out = user.outputs[0]
        old = static_shape(out)
        if old is None:
            return
        # the output drops the gathered axis; the removed unit axes go too
        rest = [i for i in range(len(shape)) if i != axis]
        new = tuple(old[k] for k, i in enumerate(rest) if i not in axes)
        out.shape = ir.Shape(list(new))
        readers = list(out.uses())
        out_axes = frozenset(k for k, i in enumerate(rest) if i in axes)
        if all(LowerRankPass._accepts(u, i, old, out_axes) for u, i in readers):
            return
        # the other readers get the old shape back (rank <= 4: the Gather dropped an axis)
        back = edit.value(f"{out.name}.old_shape", old, out)
        for reader, idx in readers:
            reader.replace_input_with(idx, back)
        reshape = ir.Node("", "Reshape", [out, edit.const_i64(old, f"{back.name}.shape")], outputs=[back])
        edit.graph.insert_after(user, reshape)

    @staticmethod
    def _squeeze_gather_inputs(
        node: ir.Node, edit: Editor, shape: tuple[int, ...], target: tuple[int, ...]
    ) -> bool:
        data, indices = node.inputs[0], node.inputs[1]
        dshape, ishape = static_shape(data), static_shape(indices)
        if data is None or indices is None or dshape is None or ishape is None:
            return False
        axis = attr_int(node, "axis", 0) % len(dshape)
        new_data = _squeezed(dshape, keep=axis)
        new_indices = _squeezed(ishape)
        new_axis = sum(1 for d in dshape[:axis] if d != 1)
        produced = new_data[:new_axis] + new_indices + new_data[new_axis + 1 :]
        if produced != target:
            return False
        for i, (value, new) in enumerate(((data, new_data), (indices, new_indices))):
            if new == static_shape(value):
                continue
            view = edit.value(f"{value.name}.rank_lowered", new, value)
            edit.graph.insert_before(
                node,
                ir.Node("", "Reshape", [value, edit.const_i64(new, f"{view.name}.shape")], outputs=[view]),
            )
            node.replace_input_with(i, view)
        node.attributes["axis"] = ir.AttrInt64("axis", new_axis)
        return True

    def _gather_nd(self, node: ir.Node, edit: Editor) -> bool:
        data, indices = node.inputs[0], node.inputs[1]
        index = const_array(indices)
        dshape = static_shape(data)
        if index is None or dshape is None or index.ndim <= MAX_RANK or attr_int(node, "batch_dims", 0) != 0:
            return False
        assert data is not None and indices is not None  # they have a shape and a constant
        depth = index.shape[-1]
        lead = dshape[:depth]
        index = np.where(index < 0, index + np.asarray(lead), index)  # negative indices count from the end
        linear = np.ravel_multi_index(tuple(np.moveaxis(index, -1, 0)), lead).astype(np.int64)
        if linear.ndim > MAX_RANK:
            return False
        flat_shape = (int(np.prod(lead)), *dshape[depth:])
        flat = edit.value(f"{data.name}.flat", flat_shape, data)
        table_tensor = ir.tensor(linear)
        table = ir.Value(name=edit.unique(f"{indices.name}.linear"), const_value=table_tensor)
        table_tensor.name = table.name
        table.shape, table.type = ir.Shape(list(linear.shape)), ir.TensorType(ir.DataType.INT64)
        edit.graph.register_initializer(table)
        gather = ir.Node("", "Gather", [flat, table], [ir.AttrInt64("axis", 0)], name=node.name)
        reshape = ir.Node(
            "", "Reshape", [data, edit.const_i64(flat_shape, f"{flat.name}.shape")], outputs=[flat]
        )
        edit.graph.insert_before(node, [reshape, gather])
        out = node.outputs[0]
        new_out = gather.outputs[0]
        new_out.shape, new_out.type = out.shape, out.type
        out.replace_all_uses_with(new_out, replace_graph_outputs=True)
        name = out.name
        edit.graph.remove(node, safe=True)
        new_out.name = name
        self.record.rank_lowered.append(indices.name or "")
        return True
