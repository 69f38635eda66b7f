"""Encodings after the HTP layout: weights renamed and re-axed, copies of moved tensors followed.

Reads the layout stage's :class:`~mha2sha.layout.record.LayoutRecord` the way
:mod:`mha2sha.encodings.propagate` reads the split's record.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from mha2sha.encodings.model import EncodingSet
from mha2sha.io.names import tensor_names
from mha2sha.layout.record import LayoutRecord

__all__ = ["remap_encodings"]

logger = logging.getLogger(__name__)


def remap_encodings(encodings: EncodingSet, record: LayoutRecord, model: ir.Model) -> EncodingSet:
    """Encodings for ``model`` after the layout passes, from those of the model before them.

    Weights are renamed and their channel/block axes moved (``axis``/``block_axis``/``rank``);
    aliases receive a copy of their original's encoding; encodings of moved tensors follow their
    values; encodings of fused or vanished tensors are dropped (logged). Encodings of tensors the
    layout passes did not touch are kept as they are.
    """
    present = tensor_names(model)
    out = encodings.copy()
    for old, remap in record.weights.items():
        enc = out.params.pop(old, None)
        if enc is None:
            continue
        new = enc.renamed(remap.new_name)
        if new.axis is not None:
            new.axis = remap.axis_map[new.axis]
        if new.block_axis is not None:
            new.block_axis = remap.axis_map[new.block_axis]
        new.rank = len(remap.new_shape)
        out.params[remap.new_name] = new
        if (
            old in present and old != remap.new_name
        ):  # the original weight still feeds another op: keep its encoding too
            out.params[old] = enc
        if out.order is not None:
            out.order = [remap.new_name if n == old else n for n in out.order]
    for old, new_name in record.moved.items():
        enc = out.activations.pop(old, None)
        if enc is not None and new_name not in out:
            out.activations[new_name] = enc.renamed(new_name)
            if out.order is not None:
                out.order.append(new_name)
    for new_name, original in record.aliases.items():
        enc = encodings.get(original) or out.get(original)
        if enc is not None and new_name not in out and new_name in present:
            out.activations[new_name] = enc.renamed(new_name)
            if out.order is not None:
                out.order.append(new_name)
    for name in list(out.activations):
        if name not in present:
            logger.info("encoding of %s dropped: %s", name, record.fused.get(name, "tensor gone"))
            del out.activations[name]
    if out.order is not None:
        out.order = list(dict.fromkeys(n for n in out.order if n in out))  # first occurrences, in order
    return out
