"""The corpus catalogue: every graph, where it comes from, what it contains, how to feed it.

Graphs come from the zoo's SDPA variants (``torch.onnx`` TorchScript / dynamo / dynamo at opset
23) and from third-party tools (``tools.TOOLS``). Listing needs nothing built: the zoo's variants
are a registry and each tool script answers ``--list``. ``CorpusGraph.path()`` builds on first use
(cached). Dynamic dims are fixed from their ``dim_param`` names (``DEFAULT_DIMS``, plus the values a
tool's manifest gives, e.g. the genai ``kv_cache_dim`` = head size); ``past_sequence_length +
sequence_length`` style expressions are evaluated, so every input gets a consistent static shape.
"""

from __future__ import annotations

import ast
import operator
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path

import numpy as np

from mha2sha.graph import is_onnx_domain

from .tools import TOOLS, VENVS, build_tool, listed_exports, manifest, output_key, outputs_root

VOCAB = 256  # every corpus model's vocabulary (scripts/_tiny.py and the zoo)

DEFAULT_DIMS: dict[str, int] = {
    "batch_size": 1,
    "text_batch_size": 1,
    "image_batch_size": 1,
    "sequence_length": 3,
    "past_sequence_length": 5,
    "total_sequence_length": 8,  # past + new, genai's name
    "decoder_sequence_length": 3,
    "past_decoder_sequence_length": 5,
    "encoder_sequence_length": 7,
}
"""Values for dim_param names; a tool's manifest overrides them per graph (Whisper's encoder length)."""

FUSED_ONNX_OPS = frozenset(
    {
        "Attention",
        "RotaryEmbedding",
        "RMSNormalization",
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "Gelu",
    }
)
"""Default-domain ops that fuse what an eager export spells out (ORT registers some of its
contrib ops in the default domain); any op of another domain (``com.microsoft``) is fused too."""


@dataclass(frozen=True)
class Features:
    """What a graph contains, read from the file (subgraphs of ``If``/``Loop`` included)."""

    fused_ops: dict[str, int]  # domain-qualified op type -> count
    softmax: int  # primitive attention cores (Softmax nodes)
    if_nodes: int
    dynamic_dims: dict[str, list[str]]  # input name -> its dim_param names, in axis order
    opsets: dict[str, int]
    external_data: bool

    def summary(self) -> str:
        parts = [f"{op} x{n}" for op, n in sorted(self.fused_ops.items())]
        if self.softmax:
            parts.append(f"Softmax x{self.softmax}")
        if self.if_nodes:
            parts.append(f"If x{self.if_nodes}")
        names = sorted({d for dims in self.dynamic_dims.values() for d in dims})
        if names:
            parts.append("dims: " + ", ".join(names))
        return "; ".join(parts)


@dataclass(frozen=True)
class CorpusGraph:
    """One corpus graph. ``tool`` is a ``TOOLS`` key or ``"zoo"``; ``tool_version`` says which release."""

    id: str
    tool: str
    tool_version: str
    family: str
    attn: str
    description: str
    export_id: str = ""  # tool graphs: the export and the part (file) of it
    part: str = ""
    case: str = ""  # zoo graphs: the variant case and its exporter
    exporter: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def path(self) -> Path:
        """The ONNX file, built (venv, export) on first use. Raises ``ToolUnavailable``/``CorpusExportError``."""
        if self.tool == "zoo":
            from .. import build

            return build(self.case, self.exporter)
        entry = manifest(self.tool)["graphs"][self.export_id]
        if entry.get("error"):
            raise CorpusExportError(f"{self.tool} could not export {self.export_id}: {entry['error']}")
        return build_tool(self.tool) / self.export_id / entry["graphs"][self.part]

    def is_built(self) -> bool:
        """True when ``path()`` would not build anything."""
        if self.tool == "zoo":
            from ..cache import MODEL_FILE, cache_key, cache_root

            return (cache_root() / cache_key(self.case, self.exporter) / MODEL_FILE).is_file()
        return (outputs_root() / output_key(self.tool) / "manifest.json").is_file()

    def dims(self) -> dict[str, int]:
        """dim_param values for this graph (defaults + the tool's per-graph values)."""
        out = dict(DEFAULT_DIMS)
        if self.tool != "zoo":
            out.update(manifest(self.tool)["graphs"][self.export_id].get("dims", {}))
        return out

    def features(self) -> Features:
        return _features(self.path())

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """A static shape for every graph input, consistent across inputs."""
        import onnx

        model = onnx.load(str(self.path()), load_external_data=False)
        dims = self.dims()
        shapes = {}
        for value in model.graph.input:
            shape = []
            for d in value.type.tensor_type.shape.dim:
                if d.HasField("dim_value"):
                    shape.append(d.dim_value)
                elif d.dim_param:
                    shape.append(_eval_dim(d.dim_param, dims, f"{self.id}: input {value.name}"))
                else:
                    raise ValueError(f"{self.id}: input {value.name} has an unnamed dynamic dim")
            shapes[value.name] = tuple(shape)
        return shapes

    def input_shape_args(self) -> list[str]:
        """``--input-shape NAME=D0,D1,...`` arguments for the inputs that have a dynamic dim."""
        dynamic = self.features().dynamic_dims
        args = []
        for name, shape in self.input_shapes().items():
            if name in dynamic:
                args += ["--input-shape", f"{name}={','.join(str(d) for d in shape)}"]
        return args

    def inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Consistent inputs: ids inside the vocabulary, all-ones masks, positions after the past,
        ``use_cache_branch`` true, N(0, 1) for float inputs (activations, pixels, past KV)."""
        if self.tool == "zoo":
            from .. import example_inputs

            return example_inputs(self.case, seed=seed or None)
        import onnx

        model = onnx.load(str(self.path()), load_external_data=False)
        shapes = self.input_shapes()
        dims = self.dims()
        rng = np.random.default_rng(seed)
        has_past = any("past" in v.name for v in model.graph.input)
        past = dims["past_sequence_length"] if has_past else 0
        feeds = {}
        for value in model.graph.input:
            name, shape = value.name, shapes[value.name]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            feeds[name] = _feed(name, shape, np.dtype(dtype), past, rng)
        return feeds


class CorpusExportError(RuntimeError):
    """A tool ran but could not export this graph (the manifest says why)."""


def _feed(name: str, shape: tuple[int, ...], dtype: np.dtype, past: int, rng) -> np.ndarray:
    lower = name.lower()
    if dtype == np.bool_:
        return np.ones(shape, dtype=bool)  # use_cache_branch: the branch with past KV
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if "mask" in lower:
        return np.ones(shape, dtype=dtype)
    if "position_ids" in lower:
        return np.broadcast_to(np.arange(past, past + shape[-1], dtype=dtype), shape).copy()
    if "input_ids" in lower:
        return rng.integers(3, VOCAB, shape).astype(dtype)
    return np.zeros(shape, dtype=dtype)  # token_type_ids and other ids


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _eval_dim(text: str, dims: dict[str, int], where: str) -> int:
    """Value of a dim_param: a known name, or +, -, *, / (exact), // of known names and integers."""
    if text in dims:
        return int(dims[text])

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in dims:
                raise KeyError(node.id)
            return int(dims[node.id])
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            a, b = ev(node.left), ev(node.right)
            if a % b:
                raise ValueError(f"{a}/{b} is not whole")
            return a // b
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(ast.dump(node))

    try:
        return ev(ast.parse(text, mode="eval"))
    except (KeyError, ValueError, SyntaxError) as e:
        raise ValueError(
            f"{where}: no value for dim {text!r} ({e}); add it to DEFAULT_DIMS or the tool's dims"
        ) from None


@cache
def _features(path: Path) -> Features:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: Counter[str] = Counter()

    def walk(graph) -> None:
        for node in graph.node:
            counts[
                f"{node.domain}.{node.op_type}" if not is_onnx_domain(node.domain) else node.op_type
            ] += 1
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    fused = {op: n for op, n in counts.items() if "." in op or op in FUSED_ONNX_OPS}
    dynamic = {}
    for value in model.graph.input:
        names = [d.dim_param or "?" for d in value.type.tensor_type.shape.dim if not d.HasField("dim_value")]
        if names:
            dynamic[value.name] = names
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    return Features(
        fused_ops=fused,
        softmax=counts.get("Softmax", 0),
        if_nodes=counts.get("If", 0),
        dynamic_dims=dynamic,
        opsets={o.domain or "ai.onnx": o.version for o in model.opset_import},
        external_data=external,
    )


def _pinned(tool: str) -> str:
    t = TOOLS[tool]
    for pin in VENVS[t.venv]:
        name, _, version = pin.partition("==")
        if name == t.version_of:
            return f"{name} {version}"
    return t.version_of


@cache
def _torch_version() -> str:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "?"


def zoo_graphs() -> list[CorpusGraph]:
    """The zoo's SDPA variants, one graph per (variant, exporter)."""
    from .. import VARIANTS

    out = []
    for case, info in VARIANTS.items():
        for exporter in info.exporters:
            out.append(
                CorpusGraph(
                    id=f"zoo_{case}_{exporter}",
                    tool="zoo",
                    tool_version=f"torch.onnx {_torch_version()} {exporter}",
                    family=info.family,
                    attn=info.attn_implementation,
                    description=info.description,
                    case=case,
                    exporter=exporter,
                )
            )
    return out


def tool_graphs(tool: str) -> list[CorpusGraph]:
    out = []
    for entry in listed_exports(tool):
        for part in entry["parts"]:
            graph_id = entry["id"] if not part else f"{entry['id']}_{part}"
            description = entry.get("description") or " ".join(
                str(entry[k]) for k in ("family", "task", "model_type") if entry.get(k)
            )
            out.append(
                CorpusGraph(
                    id=graph_id,
                    tool=tool,
                    tool_version=_pinned(tool),
                    family=entry.get("family", ""),
                    attn=entry.get("attn", ""),
                    description=description,
                    export_id=entry["id"],
                    part=part,
                    meta=entry,
                )
            )
    return out


def thirdparty_graphs(tools: tuple[str, ...] | None = None, zoo: bool = True) -> list[CorpusGraph]:
    """Every corpus graph: the zoo's SDPA variants first, then each tool's (``TOOLS`` order)."""
    graphs = zoo_graphs() if zoo else []
    for tool in tools if tools is not None else tuple(TOOLS):
        graphs += tool_graphs(tool)
    ids = [g.id for g in graphs]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise RuntimeError(f"duplicate corpus graph ids {sorted(dup)}")
    return graphs
