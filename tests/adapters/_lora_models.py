"""LoRA test models: one base graph with a LoRA branch on q/k/v/o, and real peft adapters for it.

``lora_case(family)`` builds (and caches) for a zoo decoder family (``llama``, ``llama_gqa``,
``qwen2``; KV step graphs):

- ``model.onnx``: the KV step (or prefill) graph of the HF model with an unmerged peft LoRA (rank :data:`GRAPH_RANK`, scale
  ``GRAPH_ALPHA / GRAPH_RANK``) on ``q_proj, k_proj, v_proj, o_proj``, exported with TorchScript
  (opset 17). TorchScript writes Linear weights transposed as ``onnx::MatMul_*`` constants, so
  every LoRA initializer is renamed afterwards to its peft state-dict key
  (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``) by matching values: the
  initializer equal to ``W.T`` of that peft parameter (every weight is distinct, so the match is
  unique). The graph keeps the MatMul layout (A ``[in, r]``, B ``[r, out]``): that layout, under
  those names, is what an adapter file must hold.
- one adapter per :data:`ADAPTERS` entry, made by peft (``add_adapter`` with its own rank, alpha and
  target modules, weights drawn from a seeded generator), written as safetensors keyed by the graph's
  names in the graph's layout at the adapter's own rank (padding to the graph's rank is the tool's
  job): ``<name>.safetensors`` holds peft's weights as they are (for ``--lora-alpha-from-input``,
  with ``alpha`` in the YAML), ``<name>.folded.safetensors`` has B multiplied by
  ``(alpha / r) / graph scale`` so the graph's baked-in scale gives the adapter's output.
- ``adapters.yaml`` (folded weights) and ``adapters_alpha.yaml`` (peft's weights + ``alpha``), in
  the original tool's format, and ``reference.npz``: the peft model's outputs with each adapter
  active (torch), on the zoo case's example inputs.

``aimet_adapter_encodings(case, flow)`` adds AIMET encodings (aimet-onnx, W8A16 per-channel) of the
base graph and of the base graph with each adapter's weights in (padded to the graph's rank, and
in the ``alpha`` flow with the adapter's scale in place of the graph's), cached by
``tests/encodings/aimet_gen.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np

from mha2sha import zoo
from mha2sha.zoo.cache import cache_key, cached_build

__all__ = ["ADAPTERS", "GRAPH_ALPHA", "GRAPH_RANK", "LoraCase", "lora_case", "with_adapter"]

GRAPH_RANK = 8
GRAPH_ALPHA = 6.5  # graph scale 0.8125: a value no other constant of the graph has
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    alpha: float
    targets: tuple[str, ...] = TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


#: Different ranks (below and at the graph's) and alphas; ``tiny`` adapts q and v only.
ADAPTERS = (
    AdapterSpec("french", 4, 8.0),
    AdapterSpec("oasst", 8, 4.0),
    AdapterSpec("tiny", 2, 6.0, ("q_proj", "v_proj")),
)

FAMILIES = ("llama", "llama_gqa", "qwen2")


@dataclasses.dataclass(frozen=True)
class LoraCase:
    family: str
    kind: str  # "step" | "prefill"
    folder: Path

    @property
    def model(self) -> Path:
        return self.folder / "model.onnx"

    @property
    def zoo_case(self) -> str:
        return f"{self.family}_{self.kind}"

    def yaml(self, flow: str = "folded") -> Path:
        return self.folder / ("adapters.yaml" if flow == "folded" else "adapters_alpha.yaml")

    def weights(self, name: str, flow: str = "folded") -> Path:
        return self.folder / (f"{name}.folded.safetensors" if flow == "folded" else f"{name}.safetensors")

    def reference(self) -> dict[str, dict[str, np.ndarray]]:
        """Torch outputs per adapter (``{adapter: {output: array}}``)."""
        with np.load(self.folder / "reference.npz") as z:
            out: dict[str, dict[str, np.ndarray]] = {}
            for key in z.files:
                adapter, output = key.split("/", 1)
                out.setdefault(adapter, {})[output] = z[key]
            return out


def _source_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:10]


def _peft_model(family: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mha2sha.zoo import decoders
    from mha2sha.zoo.weights import reinit_

    spec = decoders.SPECS[family]
    torch.manual_seed(0)
    config = spec.make_config()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    reinit_(model)
    graph = LoraConfig(target_modules=list(TARGETS), r=GRAPH_RANK, lora_alpha=GRAPH_ALPHA, lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, graph)
        for adapter in ADAPTERS:
            peft_model.add_adapter(
                adapter.name,
                LoraConfig(target_modules=list(adapter.targets), r=adapter.rank, lora_alpha=adapter.alpha,
                           lora_dropout=0.0),
            )  # fmt: skip
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_" in name:  # peft starts B at zero: draw both so every adapter changes the output
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
    return spec, peft_model.eval()


def _state(peft_model, adapter: str) -> dict[str, np.ndarray]:
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(peft_model, adapter_name=adapter)
    return {k: v.detach().numpy().copy() for k, v in sd.items()}


def _rename_lora_initializers(path: Path, graph_state: dict[str, np.ndarray]) -> None:
    """Give each LoRA initializer its peft name: the one whose value is ``W.T`` of that parameter."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    by_bytes: dict[bytes, list[onnx.TensorProto]] = {}
    for init in model.graph.initializer:
        by_bytes.setdefault(numpy_helper.to_array(init).tobytes(), []).append(init)
    renames: dict[str, str] = {}
    for key, value in graph_state.items():
        matches = by_bytes.get(np.ascontiguousarray(value.T).tobytes(), [])
        if len(matches) != 1:
            raise RuntimeError(f"{key}: {len(matches)} initializers hold its value")
        renames[matches[0].name] = key
    for init in model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _graph_layout(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """peft ``[r, in]`` / ``[out, r]`` -> the graph's MatMul layout ``[in, r]`` / ``[r, out]``."""
    return {k: np.ascontiguousarray(v.T) for k, v in state.items()}


def _write_yaml(path: Path, entries: list[dict]) -> None:
    import yaml

    path.write_text(yaml.safe_dump({"lora_adaptor_list": entries}, sort_keys=False))


def _lora_as_inputs(path: Path) -> None:
    """Make every LoRA initializer a graph input (aimet-onnx's ``target="ort"`` export does this)."""
    import onnx

    model = onnx.load(str(path))
    keep = []
    for init in model.graph.initializer:
        if ".lora_" in init.name:
            model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims))
        else:
            keep.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    onnx.save(model, str(path))


def _produce(family: str, kind: str, as_inputs: bool, model_path: Path) -> dict:
    import torch
    from safetensors.numpy import save_file

    from mha2sha.zoo import decoders
    from mha2sha.zoo.export import export

    folder = model_path.parent
    spec, peft_model = _peft_model(family)
    peft_model.set_adapter("default")
    if kind == "step":
        built = decoders._step(spec, decoders.STEP_AR, decoders.PAST_LEN)
    else:
        built = decoders._prefill(spec, decoders.PREFILL_LEN)
    built.module.model = peft_model.base_model.model
    export(built, model_path, "torchscript")
    _rename_lora_initializers(model_path, _state(peft_model, "default"))
    if as_inputs:
        _lora_as_inputs(model_path)

    graph_scale = GRAPH_ALPHA / GRAPH_RANK
    folded_entries, alpha_entries = [], []
    reference: dict[str, np.ndarray] = {}
    inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in zoo.example_inputs(f"{family}_{kind}").items()}
    for adapter in (None, *ADAPTERS):
        name = "default" if adapter is None else adapter.name
        peft_model.set_adapter(name)
        with torch.no_grad():
            out = built.module(*inputs.values())
        for output, value in zip(built.output_names, out, strict=True):
            reference[f"{name}/{output}"] = value.numpy()
        if adapter is None:
            continue
        raw = _graph_layout(_state(peft_model, name))
        save_file(raw, str(folder / f"{name}.safetensors"))
        ratio = np.float32(adapter.scale / graph_scale)
        folded = {k: (v * ratio if ".lora_B." in k else v) for k, v in raw.items()}
        save_file(folded, str(folder / f"{name}.folded.safetensors"))
        folded_entries.append({"name": name, "safetensor_path": f"{name}.folded.safetensors"})
        alpha_entries.append({"name": name, "safetensor_path": f"{name}.safetensors", "alpha": adapter.alpha})
    _write_yaml(folder / "adapters.yaml", folded_entries)
    _write_yaml(folder / "adapters_alpha.yaml", alpha_entries)
    np.savez(folder / "reference.npz", **reference)
    return {"family": family, "kind": kind, "adapters": [dataclasses.asdict(a) for a in ADAPTERS]}


def lora_case(family: str, kind: str = "step", *, as_inputs: bool = False) -> LoraCase:
    """The cached LoRA base graph and adapters of ``family`` (see the module docstring); with
    ``as_inputs`` the graph takes its LoRA weights as graph inputs instead of initializers."""
    tag = f"{family}_{kind}" + ("_inputs" if as_inputs else "")
    key = f"lora_{cache_key(tag, 'torchscript')}-{_source_hash()}"
    folder = cached_build(key, lambda path: _produce(family, kind, as_inputs, path)).parent
    return LoraCase(family, kind, folder)


# -- the MHA graph with an adapter in: the reference a conversion is checked against ----------------


def lora_tensors(case: LoraCase) -> dict[str, np.ndarray]:
    """The graph's LoRA initializers (name -> value)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(case.model))
    found = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if ".lora_" in i.name}
    for v in model.graph.input:
        if ".lora_" in v.name:
            dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
            found[v.name] = np.zeros(dims, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))
    return found


def padded(case: LoraCase, name: str, flow: str = "folded") -> dict[str, np.ndarray]:
    """The adapter's tensors at the graph's rank (zeros beyond its rank; zeros for tensors it lacks)."""
    from safetensors.numpy import load_file

    adapter = load_file(str(case.weights(name, flow)))
    out = {}
    for key, graph_value in lora_tensors(case).items():
        full = np.zeros_like(graph_value)
        if key in adapter:
            value = adapter[key]
            full[tuple(slice(0, d) for d in value.shape)] = value
        out[key] = full
    return out


def with_adapter(case: LoraCase, name: str, path: Path, flow: str = "folded") -> Path:
    """Write the base graph with adapter ``name`` in (and its scale, in the alpha flow) to ``path``."""
    import onnx
    from onnx import numpy_helper

    spec = next(a for a in ADAPTERS if a.name == name)
    model = onnx.load(str(case.model))
    values = padded(case, name, flow)
    for init in model.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))
    if flow == "alpha":
        graph_scale = np.float32(GRAPH_ALPHA / GRAPH_RANK)
        for node in model.graph.node:
            if node.op_type == "Constant" and "_proj/Constant" in node.output[0]:
                value = numpy_helper.to_array(node.attribute[0].t)
                if value.size == 1 and value.item() == graph_scale:
                    node.attribute[0].t.CopyFrom(
                        numpy_helper.from_array(np.asarray(spec.scale, value.dtype).reshape(value.shape))
                    )
    onnx.save(model, str(path))
    return path


def aimet_adapter_encodings(case: LoraCase, folder: Path, flow: str = "folded") -> tuple[Path, Path, Path]:
    """AIMET W8A16 encodings: ``(base model, base encodings, adapters.yaml with encodings_path)``.

    The base model is AIMET's export of the case's graph (the one the encodings name); each adapter's
    encodings come from AIMET run on the graph with that adapter in. The YAML is written to
    ``folder`` with absolute paths.
    """
    import yaml

    from tests.encodings.aimet_gen import aimet_encodings

    calibration = [zoo.example_inputs(case.zoo_case), zoo.example_inputs(case.zoo_case, seed=1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_model, base_enc = aimet_encodings(case.model, calibration, config="w8a16", version="1.0.0")
        entries = []
        for adapter in ADAPTERS:
            mha = with_adapter(case, adapter.name, folder / f"{adapter.name}.mha.onnx", flow)
            _, enc = aimet_encodings(mha, calibration, config="w8a16", version="1.0.0")
            entry = {
                "name": adapter.name,
                "safetensor_path": str(case.weights(adapter.name, flow)),
                "encodings_path": str(enc),
            }
            if flow == "alpha":
                entry["alpha"] = adapter.alpha
            entries.append(entry)
    listing = folder / f"adapters_{flow}.yaml"
    listing.write_text(yaml.safe_dump({"lora_adaptor_list": entries}, sort_keys=False))
    return base_model, base_enc, listing


def describe(case: LoraCase) -> str:
    return json.dumps({"family": case.family, "folder": str(case.folder)})
