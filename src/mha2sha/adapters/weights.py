"""Read every adapter of the list and check it against the base graph, before any heavy work.

An adapter's safetensors keys are tensor names of the base graph (initializers or graph inputs); its
values replace those tensors at run time, so each must have the graph tensor's dtype and shape --
except along the LoRA **rank axis** (:mod:`.lora`), where an adapter of lower rank is zero-padded
to the graph's rank (A gets zero output channels, B zero input channels: the product is unchanged).
A LoRA weight of the graph that an adapter does not name is zero for it (its branch is off, as in
aimet-onnx's ``set_lora_weights``); any other tensor it does not name keeps the graph's value.

The adapter's encodings (AIMET, of the graph with this adapter) overlay the base encodings by
tensor name (:func:`overlay`), so a file holding only the LoRA tensors' encodings (aimet-onnx's
LoRA flow freezes the base quantizers and calibrates those per adapter) works as well as a full
one; per-channel encodings of a padded rank axis are padded the same way (the padded channels only
ever quantize zeros, which every AIMET grid holds exactly).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping

import numpy as np
import onnx_ir as ir

from mha2sha.adapters.listing import AdapterEntry
from mha2sha.adapters.lora import LoraGraph, LoraTensor, constant_value, find_lora
from mha2sha.encodings import EncodingSet, channel_axes, load_encodings, resolve_axes
from mha2sha.encodings.axes import initializer_names, tensor_shapes
from mha2sha.encodings.propagate import pad_encoding
from mha2sha.errors import UserError
from mha2sha.io.names import tensor_names

__all__ = ["Adapter", "AdapterSet", "load_adapters"]

logger = logging.getLogger(__name__)

#: safetensors dtype names of the ONNX element types an adapter may carry
_SAFETENSORS_DTYPE = {
    ir.DataType.FLOAT: "F32",
    ir.DataType.FLOAT16: "F16",
    ir.DataType.BFLOAT16: "BF16",
    ir.DataType.DOUBLE: "F64",
    ir.DataType.INT8: "I8",
    ir.DataType.UINT8: "U8",
    ir.DataType.INT16: "I16",
    ir.DataType.INT32: "I32",
    ir.DataType.INT64: "I64",
}


@dataclasses.dataclass
class Adapter:
    """One adapter, checked: its tensors at the graph's shapes, and what was done to fit them."""

    entry: AdapterEntry
    tensors: dict[str, np.ndarray]  # graph tensor -> value at the graph's shape (the adapter's own keys)
    ranks: dict[str, tuple[int, int]]  # padded tensors: graph tensor -> (adapter's rank, graph's rank)
    encodings: EncodingSet | None = None  # its own encodings of the base graph (all or only its LoRA's)
    alpha_rank: int | None = None  # the rank its ``alpha`` divides (its LoRA tensors' common rank)

    @property
    def name(self) -> str:
        return self.entry.name


@dataclasses.dataclass
class AdapterSet:
    """Every adapter of the list, and the LoRA structure of the graph they update."""

    adapters: list[Adapter]
    lora: LoraGraph
    graph_values: dict[str, np.ndarray]  # graph tensor -> its value in the base graph (initializers)

    @property
    def names(self) -> list[str]:
        """The graph tensors some adapter updates, in graph-name order."""
        return sorted(self.lora.tensors)

    def zero_filled(self, adapter: Adapter) -> list[str]:
        """LoRA weights of the graph this adapter does not name: zero for it."""
        return [n for n, t in self.lora.tensors.items() if t.role and n not in adapter.tensors]

    def values(self, adapter: Adapter) -> Iterator[tuple[str, np.ndarray]]:
        """Every updated graph tensor's value with this adapter in, at the graph's shape."""
        for name, tensor in sorted(self.lora.tensors.items()):
            if name in adapter.tensors:
                yield name, adapter.tensors[name]
            elif tensor.role:
                yield name, np.zeros(tensor.shape, ir.DataType(tensor.dtype).numpy())
            elif name in self.graph_values:
                yield name, self.graph_values[name]


def _read(entry: AdapterEntry) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(entry.weights), framework="numpy") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"adapter {entry.name!r}: cannot read {entry.weights}: {detail}") from None


def _fit(entry: AdapterEntry, key: str, value: np.ndarray, tensor: LoraTensor) -> tuple[np.ndarray, int | None]:
    """``value`` at the graph tensor's shape (zero-padded along the rank axis), and the adapter's rank."""
    where = f"adapter {entry.name!r} ({entry.weights.name}): tensor {key!r}"
    want = ir.DataType(tensor.dtype)
    if value.dtype != want.numpy():
        got = value.dtype.name
        raise UserError(f"{where} is {got}, the graph's is {want.name.lower()} ({_SAFETENSORS_DTYPE.get(want, '?')})")
    shape = tuple(int(d) for d in value.shape)
    if shape == tensor.shape:
        return value, tensor.shape[tensor.rank_axis] if tensor.rank_axis is not None else None
    axis = tensor.rank_axis
    same_elsewhere = (
        axis is not None
        and len(shape) == len(tensor.shape)
        and all(a == b for i, (a, b) in enumerate(zip(shape, tensor.shape, strict=True)) if i != axis)
    )
    if not same_elsewhere:
        hint = f" (an adapter may differ only in its LoRA rank, axis {axis})" if axis is not None else ""
        raise UserError(f"{where} has shape {list(shape)}, the graph's is {list(tensor.shape)}{hint}")
    assert axis is not None
    if shape[axis] > tensor.shape[axis]:
        raise UserError(
            f"{where} has LoRA rank {shape[axis]} (axis {axis}), above the graph's {tensor.shape[axis]}: "
            "export the base graph with the largest rank of its adapters"
        )
    padded = np.zeros(tensor.shape, value.dtype)
    padded[tuple(slice(0, d) for d in shape)] = value
    return padded, shape[axis]


@dataclasses.dataclass
class _GraphFacts:
    """What checking encodings reads of the base graph, walked once for every adapter."""

    names: set[str]
    params: set[str]
    axes: dict[str, tuple[int, int | None]]
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, model: ir.Model) -> _GraphFacts:
        return cls(tensor_names(model), initializer_names(model), channel_axes(model), tensor_shapes(model))


def _encodings(
    entry: AdapterEntry, facts: _GraphFacts, ranks: Mapping[str, tuple[int, int]], lora: LoraGraph
) -> EncodingSet | None:
    """The adapter's own encodings (of the base graph with it), checked, their axes resolved, the
    encodings of padded tensors padded."""
    if entry.encodings is None:
        return None
    try:
        own = load_encodings(entry.encodings, param_names=facts.params)
    except UserError as exc:
        raise UserError(f"adapter {entry.name!r}: {exc}") from None
    unknown = [n for n in own.names() if n not in facts.names]
    if unknown:
        raise UserError(
            f"adapter {entry.name!r}: encodings {entry.encodings} name {len(unknown)} tensor(s) the graph "
            f"does not have (e.g. {unknown[0]!r})"
        )
    for name in [n for n in own.activations if n in facts.params]:  # 0.6.1 / 1.0.0 sections as the graph has it
        own.params[name] = own.activations.pop(name)
    for name, (small, full) in ranks.items():
        enc, tensor = own.get(name), lora.tensors[name]
        if enc is None or tensor.rank_axis is None:
            continue
        # made on the graph (the graph's rank) or on the adapter alone (aimet-onnx's LoRA flow: its rank)
        native = tuple(small if i == tensor.rank_axis else d for i, d in enumerate(tensor.shape))
        one = EncodingSet(version=own.version, params={name: enc})
        try:
            resolve_axes(one, channel_axes=facts.axes, shapes={name: tensor.shape})
        except UserError:
            enc.axis = enc.block_axis = None
            resolve_axes(one, channel_axes=facts.axes, shapes={name: native})
        padded = pad_encoding(enc, tensor.shape, tensor.rank_axis, small, full)
        if isinstance(padded, str):
            raise UserError(f"adapter {entry.name!r}: the encoding of {name!r} cannot follow its rank padding: {padded}")
        (own.params if own.kind_of(name) == "param" else own.activations)[name] = padded
    try:
        resolve_axes(own, channel_axes=facts.axes, shapes=facts.shapes)
    except UserError as exc:
        raise UserError(f"adapter {entry.name!r}: {exc}") from None
    return own


def overlay(base: EncodingSet | None, own: EncodingSet) -> EncodingSet:
    """``base`` with ``own``'s encodings in place of its own of the same names (entries shared, not copied)."""
    if base is None:
        return own
    merged = base.shallow()
    for name in own.names():
        enc = own.get(name)
        assert enc is not None
        merged.params.pop(name, None)
        merged.activations.pop(name, None)
        (merged.params if own.kind_of(name) == "param" else merged.activations)[name] = enc
    if merged.order is not None:
        listed = set(merged.order)
        merged.order += [n for n in own.names() if n not in listed]
    return merged


def load_adapters(entries: list[AdapterEntry], model: ir.Model) -> AdapterSet:
    """Read and check every adapter against ``model`` (the base graph as loaded)."""
    read = [(entry, _read(entry)) for entry in entries]
    graph_inputs = {v.name for v in model.graph.inputs}
    for entry, tensors in read:
        for key in tensors:
            if key not in model.graph.initializers and key not in graph_inputs:
                raise UserError(
                    f"adapter {entry.name!r} ({entry.weights.name}): tensor {key!r} is not an initializer "
                    "or input of the graph"
                )
    lora = find_lora(model, {k for _, tensors in read for k in tensors})
    facts = _GraphFacts.of(model) if any(e.encodings is not None for e in entries) else None
    adapters = []
    for entry, tensors in read:
        fitted: dict[str, np.ndarray] = {}
        ranks: dict[str, tuple[int, int]] = {}
        adapter_ranks: dict[str, int] = {}
        for key, value in tensors.items():
            tensor = lora.tensors[key]
            fitted[key], rank = _fit(entry, key, value, tensor)
            if rank is not None:
                adapter_ranks[key] = rank
                if rank != tensor.shape[tensor.rank_axis]:  # type: ignore[index]
                    ranks[key] = (rank, tensor.shape[tensor.rank_axis])  # type: ignore[index]
        for key, rank in adapter_ranks.items():
            partner = lora.tensors[key].partner
            if partner in adapter_ranks and adapter_ranks[partner] != rank:
                raise UserError(
                    f"adapter {entry.name!r}: {key!r} has LoRA rank {rank} but {partner!r} has "
                    f"{adapter_ranks[partner]}: A and B of one branch must agree"
                )
        common = set(adapter_ranks.values())
        adapter = Adapter(entry, fitted, ranks, alpha_rank=common.pop() if len(common) == 1 else None)
        adapter.encodings = _encodings(entry, facts, ranks, lora) if facts is not None else None
        adapters.append(adapter)
    graph_values = {}
    for name in lora.tensors:
        constant = constant_value(model.graph.initializers.get(name))
        if constant is not None and not lora.tensors[name].role:  # only non-LoRA-weight tensors keep theirs
            graph_values[name] = constant
    return AdapterSet(adapters, lora, graph_values)
