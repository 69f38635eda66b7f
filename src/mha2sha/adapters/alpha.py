"""``--lora-alpha-from-input``: the LoRA scale becomes one graph input, ``lora_alpha``.

peft multiplies each LoRA branch by ``alpha / r``, which the exporter bakes into the graph as a
constant (:attr:`~mha2sha.adapters.lora.LoraGraph.scales`). Adapters of different ``alpha`` or rank
then need different constants, so the constant of every scale site is replaced by one graph input
``lora_alpha`` (shape ``[1]``, the constant's dtype), shared by every branch, as the original tool
did: one graph serves every adapter and the runtime feeds each adapter's scale. All scale sites
must hold the same value in the base graph (one input cannot hold two).

Encodings follow (:func:`alpha_encodings`): the scale constants' encodings become the input's
(they must agree); when the file has none, the input gets an 8/16-bit per-tensor encoding on
``[0, scale]`` (the scale itself is a grid point), so the quantized graph has one for every input.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import numpy as np
import onnx_ir as ir

from mha2sha.adapters.lora import LoraGraph, constant_value
from mha2sha.adapters.weights import Adapter
from mha2sha.encodings import Encoding, EncodingSet
from mha2sha.errors import UserError
from mha2sha.io.names import tensor_names

__all__ = [
    "LORA_ALPHA",
    "AlphaRecord",
    "adapter_scale",
    "alpha_encoding",
    "alpha_encodings",
    "lora_alpha_to_input",
    "scale_of_input",
]

LORA_ALPHA = "lora_alpha"


@dataclasses.dataclass
class AlphaRecord:
    """What ``--lora-alpha-from-input`` did."""

    input: str
    value: float  # the base graph's scale: what ``lora_alpha`` is fed to reproduce it
    dtype: ir.DataType
    sites: list[str]  # Mul nodes that now read the input
    constants: dict[str, float]  # scale tensors replaced -> value
    removed: list[str] = dataclasses.field(default_factory=list)  # those no other node reads: gone
    encoding_source: str = ""  # where the base encodings' lora_alpha encoding came from

    def feed(self, value: float | None = None) -> np.ndarray:
        """The ``lora_alpha`` input for ``value`` (default: the base graph's scale)."""
        return np.asarray([self.value if value is None else value], self.dtype.numpy())

    def to_dict(self) -> dict[str, object]:
        return {
            "input": self.input,
            "value": self.value,
            "sites": len(self.sites),
            "constants": self.constants,
            "encoding": self.encoding_source or None,
        }


def graph_scale(lora: LoraGraph) -> float:
    """The one LoRA scale of the base graph (refused when there is none, or several)."""
    if not lora.scales:
        raise UserError(
            "--lora-alpha-from-input: no LoRA scale found (a Mul by a constant between the adapters' A and "
            "the end of their branch); the graph's LoRA has no scale to feed"
        )
    values = sorted({s.value for s in lora.scales})
    if len(values) > 1:
        raise UserError(
            f"--lora-alpha-from-input: the graph's LoRA branches have different scales ({', '.join(map(str, values))}):"
            " one lora_alpha input cannot serve them; export the base graph with one alpha / r for every branch"
        )
    return values[0]


def adapter_scale(adapter: Adapter, lora: LoraGraph) -> tuple[float, str]:
    """The ``lora_alpha`` value of ``adapter`` and where it comes from: its ``alpha`` over its rank,
    the scale tensors it carries, or (neither) the base graph's own scale."""
    where = f"adapter {adapter.name!r}"
    constants = lora.scale_constants
    carried = {float(np.asarray(v).reshape(-1)[0]) for k, v in adapter.tensors.items() if k in constants}
    if len(carried) > 1:
        raise UserError(f"{where}: its scale tensors hold different values {sorted(carried)}; one lora_alpha cannot")
    from_yaml = adapter.entry.scale
    said = f"lora_alpha {from_yaml:g}" if from_yaml is not None else ""
    if adapter.entry.alpha is not None:
        if adapter.alpha_rank is None:
            raise UserError(f"{where}: its LoRA tensors have different ranks, so 'alpha' gives no single scale")
        scale = adapter.entry.alpha / adapter.alpha_rank
        if from_yaml is not None and not np.isclose(from_yaml, scale, rtol=1e-6):
            raise UserError(f"{where}: alpha {adapter.entry.alpha:g} / rank {adapter.alpha_rank} != lora_alpha {from_yaml:g}")
        from_yaml, said = scale, f"alpha {adapter.entry.alpha:g} / rank {adapter.alpha_rank}"
    if from_yaml is not None and carried and not np.isclose(from_yaml, next(iter(carried)), rtol=1e-6):
        raise UserError(f"{where}: {said} = {from_yaml:g} but its scale tensors hold {next(iter(carried)):g}")
    if from_yaml is not None:
        return from_yaml, said
    if carried:
        return next(iter(carried)), "its scale tensors"
    return graph_scale(lora), "the base graph's scale"


def lora_alpha_to_input(model: ir.Model, lora: LoraGraph) -> AlphaRecord:
    """Replace every LoRA scale constant of ``model`` by the graph input ``lora_alpha`` (in place)."""
    value = graph_scale(lora)
    if LORA_ALPHA in tensor_names(model):
        raise UserError(f"--lora-alpha-from-input: the graph already has a tensor named {LORA_ALPHA!r}")
    first = lora.scales[0].node.inputs[lora.scales[0].index]
    assert first is not None
    dtype = first.dtype or ir.DataType.FLOAT
    alpha = ir.Value(name=LORA_ALPHA, shape=ir.Shape([1]), type=ir.TensorType(dtype))
    model.graph.inputs.append(alpha)
    constants = {s.constant: s.value for s in lora.scales}
    replaced = [s.node.inputs[s.index] for s in lora.scales]
    for site in lora.scales:
        site.node.replace_input_with(site.index, alpha)
    removed = sorted({v.name for v in replaced if v is not None and v.name and not v.uses()})
    return AlphaRecord(LORA_ALPHA, value, dtype, [s.node.name or "" for s in lora.scales], constants, removed)


def _holds(enc: Encoding, value: float) -> bool:
    """``value`` lies on the per-tensor grid's range (within half a step)."""
    if enc.enc_type != "PER_TENSOR" or enc.is_float or not enc.has_scale:
        return enc.is_float
    scale, offset = float(np.asarray(enc.scale).reshape(-1)[0]), float(np.asarray(enc.offset).reshape(-1)[0])
    low, high = offset * scale, (offset + 2**enc.bitwidth - 1) * scale
    return low - scale / 2 <= value <= high + scale / 2


def alpha_encoding(encodings: EncodingSet, record: AlphaRecord, value: float) -> tuple[Encoding, str]:
    """The ``lora_alpha`` input's encoding for an adapter of scale ``value`` (``encodings``: the graph's
    with this adapter, before the change), and where it came from."""
    found = [e for n in record.constants if (e := encodings.get(n)) is not None]
    if found and _holds(found[0], value):
        differ = not all(e.same_numbers(found[0]) for e in found[1:])
        source = f"first of {len(found)} differing scale encodings" if differ else "the scale constants' encoding"
        return found[0].renamed(record.input), source
    bits = Counter(e.bitwidth for e in encodings.activations.values() if not e.is_float).most_common(1)
    bw = bits[0][0] if bits else 16
    enc = Encoding(
        name=record.input,
        bitwidth=bw,
        is_symmetric=False,
        scale=np.asarray(value / (2**bw - 1), np.float64),
        offset=np.asarray(0.0, np.float64),
        min=np.asarray(0.0, np.float64),
        max=np.asarray(value, np.float64),
    )
    why = "none in the encodings" if not found else f"the scale constants' encoding does not reach {value:g}"
    return enc, f"made for [0, {value:g}] at {bw} bits ({why})"


def alpha_encodings(encodings: EncodingSet, record: AlphaRecord, enc: Encoding) -> EncodingSet:
    """``encodings`` for the graph with the ``lora_alpha`` input: ``enc`` on the input, and no encoding
    for the scale constants the change removed (a constant other nodes still read keeps its own)."""
    out = encodings.shallow()
    for name in record.removed:
        out.params.pop(name, None)
        out.activations.pop(name, None)
    out.activations[record.input] = enc.renamed(record.input)
    if out.order is not None:
        out.order = [n for n in out.order if n not in record.removed] + [record.input]
    return out



def scale_of_input(original: ir.Model, converted: ir.Model, name: str = LORA_ALPHA) -> np.ndarray | None:
    """The value a converted graph's ``lora_alpha`` input must be fed to compute what ``original``
    computes (to verify a conversion again): the constant each node reading the input read in the
    original (node names are kept; a per-head copy is named ``<name>.h<k>``). None when the converted graph has no such input or the constants
    disagree."""
    value = next((v for v in converted.graph.inputs if v.name == name), None)
    if value is None or any(v.name == name for v in original.graph.inputs):
        return None
    nodes = {n.name: n for n in original.graph if n.name}
    found = set()
    for node, index in value.uses():
        name = node.name or ""
        while name not in nodes and re.search(r"\.h\d+(_\d+)?$", name):  # a per-head copy: <name>.h<k>
            name = re.sub(r"\.h\d+(_\d+)?$", "", name)
        before = nodes.get(name)
        constant = constant_value(before.inputs[index]) if before is not None and index < len(before.inputs) else None
        if constant is None or constant.size != 1:
            return None
        found.add(float(constant.reshape(-1)[0]))
    if len(found) != 1:
        return None
    return np.asarray([found.pop()], (value.dtype or ir.DataType.FLOAT).numpy())
