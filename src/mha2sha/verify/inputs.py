"""Realistic inputs for a model, so that verifying a conversion exercises real attention.

Random noise in every input proves little: random token ids can fall outside the vocabulary,
random masks hide whole rows (NaN softmax) and random positions make RoPE meaningless.  This
module fills each graph input from its name, dtype, static shape and the dataflow it feeds:

============================  ===============================================================
input                         value
============================  ===============================================================
token ids (int, feeds an      uniform in ``[0, vocab)``; ``vocab`` = dim 0 of the embedding
embedding ``Gather``)         table, found through Cast/Reshape/Unsqueeze/...; else [0, 100)
``*mask*`` of rank <= 2       ones (``True``): every position visible, no padding, so no row
                              is ever fully masked
``*mask*`` of rank >= 3       causal over the last two dims ``[.., AR, CL]``: query row ``i``
                              sees the ``CL - AR`` past positions and new positions ``<= i``.
                              float -> additive ``0`` / :data:`MASK_NEG`, bool -> True/False,
                              int -> 1/0
``position_ids``              ``arange(past, past + S)`` along the last dim
``cache_position``            same as ``position_ids``
``*cos*`` / ``*sin*`` float   RoPE tables: ``cos/sin(pos * 10000 ** (-k / F))``, ``F`` = last
                              dim (D/2 frequencies), positions along dim -2
``seqlens_k`` /               ORT GroupQueryAttention: ``total - 1`` / ``total``
``total_sequence_length``
other floats (past KV,        normal(0, 1) in the input's dtype (bfloat16 via ml_dtypes)
pixel_values, features...)
``uint8`` images              uniform in [0, 255]
other ints                    uniform in ``[0, min(last dim, 100))``
other bools                   True
============================  ===============================================================

``past`` (the number of cached positions) is inferred from the shapes: a rank >= 3 mask gives
``CL - AR``; else a 2-D attention mask gives ``L - S``; else a past key/value input gives its
dim -2.  Everything is deterministic from ``seed`` and each input gets its own stream keyed by
its name, so adding an input to a model does not change the values of the others.

:func:`plan_inputs` does all the reading and checking up front (the model's input signature and
dataflow, the headers of a user ``.npz``) and returns a :class:`ModelInputs` mapping that makes each
array only when it is asked for: ``convert`` plans at load time, so bad inputs fail before any heavy
work, and makes the arrays right before verifying (2 GB of past KV for 7B at CL 4096 are not held
through the split and the save); blockwise verification makes each layer's KV for its block only.
"""

from __future__ import annotations

import logging
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from mha2sha.errors import UserError
from mha2sha.graph import RESHAPE_OPS, is_onnx_domain, name_of

__all__ = [
    "MASK_NEG",
    "ROPE_THETA",
    "ModelInputs",
    "load_inputs",
    "make_inputs",
    "parse_input_shapes",
    "plan_inputs",
]

logger = logging.getLogger(__name__)

#: Additive value of a masked position in float masks.  Qualcomm's prepared-LLM pipelines use
#: -100: after softmax it is exactly 0 in fp16 and ~4e-44 in fp32, it never overflows to -inf
#: when added to scores in fp16 (unlike ``finfo.min``), and it sits inside the calibrated range
#: of quantized mask inputs, so QDQ models see the mask they were calibrated for.
MASK_NEG = -100.0

#: RoPE base used for ``*cos*`` / ``*sin*`` inputs (Llama, Qwen2 < 1M context, Mistral...).
ROPE_THETA = 10000.0

_FALLBACK_VOCAB = 100
_SMALL_INT_CAP = 100
_PASS_THROUGH = RESHAPE_OPS | {"Cast", "Identity", "Expand"}  # token ids keep their values
_TABLE_PRODUCERS = frozenset({"DequantizeLinear", "Cast", "Identity", "Constant"})
_TOKEN_ID_NAMES = frozenset({"input_ids", "decoder_input_ids", "token_ids", "tokens", "input_tokens"})


@dataclass(frozen=True)
class _Spec:
    """One graph input to fill: its name, numpy dtype, resolved static shape and, for integer
    inputs that index an embedding table, the table's rows (read from the graph when planning)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    vocab: int | None = None


# ----------------------------------------------------------------------------- shapes


def parse_input_shapes(specs: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``--input-shape NAME=1,128`` arguments into ``{name: (1, 128)}``.

    The name is everything before the last ``=`` so names containing ``=`` still work.
    Raises UserError on bad syntax, negative dims or a name given twice.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims_text = spec.rpartition("=")
        name = name.strip()
        if not sep or not name or not dims_text.strip():
            raise UserError(f"bad --input-shape {spec!r}: expected NAME=D1,D2,... e.g. input_ids=1,128")
        try:
            dims = tuple(int(d) for d in dims_text.split(","))
        except ValueError:
            raise UserError(
                f"bad --input-shape {spec!r}: dims must be integers separated by commas, e.g. {name}=1,128"
            ) from None
        if any(d < 1 for d in dims):
            raise UserError(f"bad --input-shape {spec!r}: dims must be >= 1")
        if name in shapes:
            raise UserError(f"--input-shape given twice for input {name!r}")
        shapes[name] = dims
    return shapes


def _feedable_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs the caller must feed (IR < 4 models also list initializers as inputs)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def _suggest(value: ir.Value) -> str:
    """A plausible ``--input-shape`` for a value with symbolic dims (batch 1, sequence 128)."""
    dims = []
    for i, d in enumerate(value.shape or ()):
        dims.append(str(d) if isinstance(d, int) else ("1" if i == 0 else "128"))
    return f"--input-shape {value.name}={','.join(dims) or '1'}"


def _resolve_shapes(
    model: ir.Model, overrides: Mapping[str, Sequence[int]] | None
) -> dict[str, tuple[int, ...]]:
    """Static shape of every feedable input, applying ``overrides``; UserError if any is unknown."""
    overrides = dict(overrides or {})
    inputs = _feedable_inputs(model)
    known = {name_of(v) for v in inputs}
    for name in overrides:
        if name not in known:
            raise UserError(
                f"--input-shape names {name!r}, which is not a model input (inputs: {', '.join(sorted(known))})"
            )
    resolved: dict[str, tuple[int, ...]] = {}
    for v in inputs:
        name = v.name or ""
        if v.shape is None and name not in overrides:
            raise UserError(f"input {name!r} has no declared shape; give it with {_suggest(v)}")
        if name in overrides:
            dims = tuple(int(d) for d in overrides[name])
            if v.shape is not None:
                if len(dims) != len(v.shape):
                    raise UserError(
                        f"--input-shape {name}={','.join(map(str, dims))} has rank {len(dims)} "
                        f"but input {name!r} has rank {len(v.shape)} {_fmt_shape(v.shape)}"
                    )
                for got, want in zip(dims, v.shape, strict=True):
                    if isinstance(want, int) and got != want:
                        raise UserError(
                            f"--input-shape {name}={','.join(map(str, dims))} conflicts with the "
                            f"model's static shape {_fmt_shape(v.shape)}"
                        )
            resolved[name] = dims
            continue
        assert v.shape is not None
        if not all(isinstance(d, int) for d in v.shape):
            others = sum(
                1
                for w in inputs
                if w is not v
                and w.name not in overrides
                and w.shape is not None
                and not all(isinstance(d, int) for d in w.shape)
            )
            more = f" ({others} more input(s) are dynamic too)" if others else ""
            raise UserError(
                f"input {name!r} has a dynamic shape {_fmt_shape(v.shape)}; fix it with {_suggest(v)}{more}"
            )
        resolved[name] = v.shape.numpy()  # static: checked above
    return resolved


def _fmt_shape(shape: Iterable[object]) -> str:
    return "[" + ",".join(str(d) if d is not None else "?" for d in shape) + "]"


def _np_dtype(value: ir.Value) -> np.dtype:
    if value.dtype is None:
        raise UserError(f"input {value.name!r} has no element type in the model")
    try:
        return np.dtype(value.dtype.numpy())
    except Exception:
        raise UserError(
            f"input {value.name!r} has element type {value.dtype.name}, which cannot be generated"
        ) from None


# ----------------------------------------------------------------------------- dataflow


def _table_rows(value: ir.Value, axis: int, depth: int = 4) -> int | None:
    """Rows (dim ``axis`` = 0) of ``value`` if it is a constant table or a DQ/Cast view of one.

    Shapes are read from the root initializer because intermediate values of a model that was
    never shape-inferred have none; only shapes are read, never the weight data.
    """
    shape: ir.ShapeProtocol | None = value.shape
    if value.is_initializer() or value.const_value is not None:
        if shape is None and value.const_value is not None:
            shape = value.const_value.shape
        if shape is None or len(shape) == 0 or axis not in (0, -len(shape)):
            return None
        rows = shape[0]
        return rows if isinstance(rows, int) else None
    node = value.producer()
    if depth == 0 or node is None or node.op_type not in _TABLE_PRODUCERS:
        return None
    if node.op_type == "Constant":
        attr = node.attributes.get("value")
        dims = getattr(getattr(attr, "value", None), "shape", None)
        if dims is None or len(dims) == 0 or axis not in (0, -len(dims)):
            return None
        return int(dims[0])
    source = node.inputs[0] if node.inputs else None
    return None if source is None else _table_rows(source, axis, depth - 1)


def _embedding_vocab(value: ir.Value) -> int | None:
    """Rows of the embedding table that ``value`` indexes (through shape-only ops), if any."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for node, idx in v.uses():
            if not is_onnx_domain(node.domain):
                continue
            if node.op_type == "Gather" and idx == 1 and node.inputs[0] is not None:
                rows = _table_rows(node.inputs[0], node.attributes.get_int("axis", 0))
                if rows is not None:
                    return rows
            elif node.op_type in _PASS_THROUGH and idx == 0:
                stack.extend(node.outputs)
    return None


# ----------------------------------------------------------------------------- classification


def _lname(name: str) -> str:
    return name.lower()


def _is_mask(name: str) -> bool:
    return "mask" in _lname(name)


def _is_position(name: str) -> bool:
    n = _lname(name)
    return n in ("position_ids", "cache_position", "position") or n.endswith(
        ("position_ids", "cache_position")
    )


def _is_rope(name: str, dtype: np.dtype) -> str | None:
    """'cos' / 'sin' for RoPE table inputs such as ``position_ids_cos``."""
    if not _is_float(dtype):
        return None
    tokens = set(re.split(r"[^a-z0-9]+", _lname(name)))
    if "cos" in tokens:
        return "cos"
    if "sin" in tokens:
        return "sin"
    return None


def _is_past(name: str) -> bool:
    n = _lname(name)
    return any(k in n for k in ("past", "cache", "present")) and not _is_position(name)


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name in ("bfloat16",) or dtype.name.startswith("float8")


def _is_int(dtype: np.dtype) -> bool:
    return dtype.kind in "iu"


# ----------------------------------------------------------------------------- lengths


@dataclass(frozen=True)
class _Lengths:
    """Sequence bookkeeping shared by masks and positions: S new tokens after ``past`` cached ones."""

    new: int | None
    past: int

    @property
    def total(self) -> int:
        return self.past + (self.new or 0)


def _infer_lengths(specs: Sequence[_Spec]) -> _Lengths:
    """Infer (new, past) from the shapes of ids, embeddings, masks, positions and past KV."""
    new: int | None = None
    by_name = {_lname(s.name): s for s in specs}
    for key in ("input_ids", "decoder_input_ids", "token_ids", "tokens", "input_tokens"):
        s = by_name.get(key)
        if s is not None and s.shape:
            new = s.shape[-1]
            break
    if new is None:
        for s in specs:
            if _lname(s.name) in ("inputs_embeds", "decoder_inputs_embeds") and len(s.shape) >= 2:
                new = s.shape[-2]
                break
    if new is None:
        for s in specs:
            if _is_position(s.name) and s.shape:
                new = s.shape[-1]
                break

    big_masks = [s for s in specs if _is_mask(s.name) and len(s.shape) >= 3]
    if big_masks:
        m = big_masks[0]
        ar, cl = m.shape[-2], m.shape[-1]
        return _Lengths(new=ar if new is None else new, past=max(cl - ar, 0))

    flat_masks = [
        s
        for s in specs
        if _is_mask(s.name)
        and len(s.shape) == 2
        and "encoder" not in _lname(s.name)
        and "cross" not in _lname(s.name)
    ]
    if flat_masks and new is not None:
        return _Lengths(new=new, past=max(flat_masks[0].shape[-1] - new, 0))

    pasts = [s for s in specs if _is_past(s.name) and _is_float(s.dtype) and len(s.shape) >= 3]
    values = [
        s for s in pasts if "value" in _lname(s.name) or re.search(r"(^|[^a-z])v([^a-z]|$)", _lname(s.name))
    ]
    chosen = (values or pasts)[:1]
    if chosen:
        return _Lengths(new=new, past=chosen[0].shape[-2])
    return _Lengths(new=new, past=0)


# ----------------------------------------------------------------------------- generators


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(name.encode("utf-8"))])


def _positions_along_last(shape: tuple[int, ...], past: int, dtype: np.dtype) -> np.ndarray:
    n = shape[-1] if shape else 1
    pos = np.arange(past, past + n, dtype=np.int64)
    return np.broadcast_to(pos, shape).astype(dtype) if shape else np.asarray(past, dtype=dtype)


def _causal_mask(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``[..., AR, CL]`` mask: row i sees the CL-AR past positions and new positions <= i."""
    ar, cl = shape[-2], shape[-1]
    past = cl - ar
    rows = np.arange(ar)[:, None]
    cols = np.arange(cl)[None, :]
    visible = cols <= rows + past  # past columns (< past) are always <= i + past
    if dtype == np.bool_:
        grid = visible
    elif _is_float(dtype):
        grid = np.where(visible, 0.0, MASK_NEG).astype(np.float32)
    else:
        grid = visible.astype(np.int64)
    return np.broadcast_to(grid, shape).astype(dtype)


def _rope(shape: tuple[int, ...], past: int, kind: str, dtype: np.dtype) -> np.ndarray:
    """RoPE cos/sin of positions past.. along dim -2 and F = shape[-1] frequencies."""
    freqs = shape[-1] if shape else 1
    rows = shape[-2] if len(shape) >= 2 else 1
    inv_freq = ROPE_THETA ** (-np.arange(freqs, dtype=np.float64) / max(freqs, 1))
    angles = np.arange(past, past + rows, dtype=np.float64)[:, None] * inv_freq[None, :]
    table = np.cos(angles) if kind == "cos" else np.sin(angles)
    if len(shape) < 2:
        table = table.reshape(shape)
    return np.broadcast_to(table, shape).astype(np.float32).astype(dtype)


def _generate(spec: _Spec, lengths: _Lengths, seed: int) -> np.ndarray:
    name, dtype, shape = spec.name, spec.dtype, spec.shape
    lname = _lname(name)
    rng = _rng(seed, name)

    if _is_mask(name):
        if len(shape) >= 3:
            return _causal_mask(shape, dtype)
        return np.ones(shape, dtype=dtype)

    if _is_int(dtype):
        if _is_position(name):
            return _positions_along_last(shape, lengths.past, dtype)
        if "seqlens_k" in lname:
            return np.full(shape, lengths.total - 1, dtype=dtype)
        if "total_sequence_length" in lname or "total_seq_len" in lname:
            return np.full(shape, lengths.total, dtype=dtype)
        vocab = spec.vocab
        if vocab is None and lname in _TOKEN_ID_NAMES:
            vocab = _FALLBACK_VOCAB
        if vocab is not None:
            if dtype.kind == "u" or dtype.itemsize < 8:
                vocab = min(vocab, int(np.iinfo(dtype).max) + 1)
            return rng.integers(0, max(vocab, 1), size=shape).astype(dtype)
        if dtype == np.uint8 and any(k in lname for k in ("pixel", "image", "img")):
            return rng.integers(0, 256, size=shape).astype(dtype)
        high = min(shape[-1] if shape else 1, _SMALL_INT_CAP)
        return rng.integers(0, max(high, 1), size=shape).astype(dtype)

    if dtype == np.bool_:
        return np.ones(shape, dtype=np.bool_)

    if _is_float(dtype):
        if _is_position(name):
            return _positions_along_last(shape, lengths.past, dtype)
        kind = _is_rope(name, dtype)
        if kind is not None:
            return _rope(shape, lengths.past, kind, dtype)
        return rng.standard_normal(size=shape, dtype=np.float32).astype(dtype)

    if dtype.kind == "c":
        return (rng.standard_normal(size=shape) + 1j * rng.standard_normal(size=shape)).astype(dtype)
    raise UserError(f"input {name!r} has element type {dtype}, which cannot be generated")


# ----------------------------------------------------------------------------- .npz


def _npz_headers(path: Path) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every array of an ``.npz``, from the ``.npy`` headers only."""
    try:
        with zipfile.ZipFile(path) as zf:
            headers = {}
            for info in zf.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                    else:  # other header versions: read the array itself
                        with zf.open(info) as g:
                            array = np.lib.format.read_array(g, allow_pickle=False)
                        shape, dtype = array.shape, array.dtype
                headers[key] = (np.dtype(dtype), tuple(int(d) for d in shape))
            return headers
    except FileNotFoundError:
        raise UserError(f"inputs file {str(path)!r} does not exist") from None
    except Exception as exc:
        raise UserError(f"cannot read inputs file {str(path)!r} as .npz: {exc}") from None


def _read_npz(path: Path, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as npz:
            array = npz[name]
    except Exception as exc:
        raise UserError(f"cannot read input {name!r} from {str(path)!r}: {exc}") from None
    if array.dtype != dtype or array.shape != shape:
        raise UserError(f"{path.name}: input {name!r} changed since it was checked")
    if _is_float(array.dtype) and not np.all(np.isfinite(array)):
        count = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise UserError(
            f"{path.name}: input {name!r} has {count} NaN/inf value(s); verification needs finite inputs"
        )
    return array


# ----------------------------------------------------------------------------- public


def _specs(model: ir.Model, shapes: Mapping[str, Sequence[int]] | None) -> list[_Spec]:
    resolved = _resolve_shapes(model, shapes)
    specs = []
    for v in _feedable_inputs(model):
        dtype = _np_dtype(v)
        vocab = _embedding_vocab(v) if _is_int(dtype) else None
        spec = _Spec(v.name or "", dtype, resolved[v.name or ""], vocab)
        generable = _is_mask(spec.name) or _is_int(dtype) or dtype == np.bool_ or _is_float(dtype)
        if not (generable or dtype.kind == "c"):
            raise UserError(f"input {spec.name!r} has element type {dtype}, which cannot be generated")
        specs.append(spec)
    return specs


class ModelInputs(Mapping[str, np.ndarray]):
    """Verification inputs of a model, in graph input order, each made when it is asked for.

    Made by :func:`plan_inputs`, which has already checked everything: ``inputs[name]`` generates
    the input (or reads it from the user's ``.npz``) afresh on every call and keeps nothing, so
    the same seed always gives the same values and memory holds only the arrays the caller keeps.
    ``dict(inputs)`` makes them all.
    """

    def __init__(
        self,
        specs: Sequence[_Spec],
        lengths: _Lengths,
        seed: int,
        npz: Path | None = None,
        provided: Iterable[str] = (),
    ):
        self._specs = {s.name: s for s in specs}
        self._lengths = lengths
        self._seed = seed
        self._npz = npz
        self._provided = frozenset(provided)
        #: inputs made here although the user gave an .npz (it does not have them)
        self.generated = [n for n in self._specs if n not in self._provided] if npz is not None else []
        #: inputs of the converted model that the original does not take, with their one value
        #: (``--lora-alpha-from-input``'s ``lora_alpha``: the graph's own scale); see :meth:`add_fixed`
        self.fixed: dict[str, np.ndarray] = {}

    def add_fixed(self, name: str, value: np.ndarray) -> None:
        """Feed ``value`` as input ``name`` (a model that does not take it ignores it)."""
        self.fixed[name] = np.ascontiguousarray(value)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.fixed:
            return self.fixed[name]
        spec = self._specs[name]
        if self._npz is not None and name in self._provided:
            return _read_npz(self._npz, name, spec.dtype, spec.shape)
        return np.ascontiguousarray(_generate(spec, self._lengths, self._seed))

    def __contains__(self, name: object) -> bool:
        return name in self._specs or name in self.fixed

    def generic(self, name: str) -> bool:
        """``name`` is generated as plain normal(0, 1) values (a KV cache, features): any other
        normal draw of its dtype and shape serves as well (blockwise verification draws it once for
        every block that reads such an input, instead of once per layer)."""
        spec = self._specs[name]
        if self._npz is not None and name in self._provided:
            return False
        return (
            _is_float(spec.dtype)
            and spec.dtype.kind == "f"
            and not _is_mask(name)
            and not _is_position(name)
            and _is_rope(name, spec.dtype) is None
        )

    def __iter__(self) -> Iterator[str]:
        return iter([*self._specs, *(n for n in self.fixed if n not in self._specs)])

    def __len__(self) -> int:
        return len(self._specs) + sum(n not in self._specs for n in self.fixed)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: s.shape for name, s in self._specs.items()}

    @property
    def nbytes(self) -> int:
        """Bytes of all inputs together (what ``dict(self)`` holds)."""
        planned = sum(int(np.prod(s.shape, dtype=np.int64)) * s.dtype.itemsize for s in self._specs.values())
        return planned + sum(v.nbytes for n, v in self.fixed.items() if n not in self._specs)


def plan_inputs(
    model: ir.Model,
    seed: int = 0,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    npz: str | Path | None = None,
) -> ModelInputs:
    """Check and plan one realistic value for every graph input; arrays are made on demand.

    Raises every UserError :func:`make_inputs` / :func:`load_inputs` would (dynamic dims, types
    that cannot be generated, a bad ``.npz``: only its array headers are read here), so callers
    can plan early and make the arrays late.  Only shapes, dtypes and graph structure are read.
    """
    provided: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    path = Path(npz) if npz is not None else None
    if path is not None:
        provided = _npz_headers(path)
    inputs = {name_of(v): v for v in _feedable_inputs(model)}
    symbols: dict[str, int] = {}
    for name, (dtype, shape) in provided.items():
        assert path is not None
        v = inputs.get(name)
        if v is None:
            raise UserError(f"{path.name}: array {name!r} is not a model input (inputs: {', '.join(inputs)})")
        want = _np_dtype(v)
        if dtype != want:
            raise UserError(f"{path.name}: input {name!r} has dtype {dtype}, the model expects {want}")
        if v.shape is not None:
            ok = len(shape) == len(v.shape) and all(
                not isinstance(d, int) or d == n for d, n in zip(v.shape, shape, strict=False)
            )
            if not ok:
                raise UserError(
                    f"{path.name}: input {name!r} has shape {_fmt_shape(shape)}, "
                    f"the model expects {_fmt_shape(v.shape)}"
                )
            for d, n in zip(v.shape, shape, strict=True):
                if (
                    isinstance(d, ir.SymbolicDim)
                    and d.value is not None
                    and symbols.setdefault(d.value, n) != n
                ):
                    raise UserError(
                        f"{path.name}: input {name!r} sets dim {d.value!r}={n} but another input "
                        f"set it to {symbols[d.value]}"
                    )

    merged: dict[str, Sequence[int]] = dict(shapes or {})
    if path is not None:
        merged = {}
        for name, v in inputs.items():
            if name in provided:
                merged[name] = provided[name][1]
            elif shapes and name in shapes:
                merged[name] = shapes[name]
            elif v.shape is not None and not v.shape.is_static():
                dims = [
                    d if isinstance(d, int) else symbols.get(d.value) if d.value else None for d in v.shape
                ]
                known_dims = [d for d in dims if d is not None]
                if len(known_dims) == len(dims):
                    merged[name] = [int(d) for d in known_dims]
    specs = _specs(model, merged)
    planned = ModelInputs(specs, _infer_lengths(specs), seed, path, provided)
    if planned.generated:
        logger.warning("%s has no %s: generated", path, ", ".join(planned.generated))
    return planned


def make_inputs(
    model: ir.Model, seed: int = 0, *, shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, np.ndarray]:
    """Generate one realistic value for every graph input, in graph input order.

    ``shapes`` (from :func:`parse_input_shapes`) fixes symbolic dims; every input must end up with
    a static shape, else UserError names the input and suggests ``--input-shape``.  Only shapes,
    dtypes and graph structure are read: no weight data is loaded.
    """
    return dict(plan_inputs(model, seed, shapes=shapes))


def load_inputs(
    path: str | Path,
    model: ir.Model,
    seed: int = 0,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Read user inputs from an ``.npz``; generate the inputs it does not provide.

    Each array must be named after a model input and match its dtype exactly and its static dims
    (symbolic dims accept any size).  Sizes bound to a symbolic dim by a provided array (e.g.
    ``sequence_length`` = 128 from ``input_ids``) also fix that dim in generated inputs, so the
    generated mask and positions agree with the user's ids.  Raises UserError naming the
    offending input.
    """
    return dict(plan_inputs(model, seed, shapes=shapes, npz=path))
