"""LoRA adapters end to end: real peft adapters (ranks 2, 4, 8, different alphas, on q/k/v/o) of one
base graph, split like the graph, each verified float and quantized (its own AIMET encodings), and the
written SHA adapter files reproducing the peft model's own outputs with that adapter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from safetensors.numpy import load_file

from mha2sha import zoo
from mha2sha.adapters import read_adapter_list
from mha2sha.api import ConversionFailed, ConvertOptions, convert
from mha2sha.encodings import load_encodings
from mha2sha.verify.split_io import per_head_feeds
from tests.adapters._lora_models import ADAPTERS, GRAPH_RANK, aimet_adapter_encodings, lora_case
from tests.encodings.aimet_gen import aimet_available

ZERO_FILLED_TINY = 2 * 2 * 2  # tiny adapts q and v only: k and o (A and B) of 2 layers are zero for it


def sha_outputs(out: Path, adapter: str, inputs: dict[str, np.ndarray], split=None) -> dict[str, np.ndarray]:
    """Run the written SHA model with the written adapter files, found through out/adapters.yaml
    (per-head KV inputs cut, outputs joined, by the conversion's ``split`` record)."""
    entry = next(e for e in read_adapter_list(out / "adapters.yaml") if e.name == adapter)
    model = ir.load(out / "model.onnx")
    feeds = per_head_feeds(inputs, split) if split is not None else dict(inputs)
    for name, value in load_file(str(entry.weights)).items():
        if name in model.graph.initializers:
            model.graph.initializers[name].const_value = ir.tensor(value, name=name)
        else:
            feeds[name] = value
    if entry.scale is not None:
        feeds["lora_alpha"] = np.asarray([entry.scale], np.float32)
    path = out.parent / f"{out.name}-{adapter}.onnx"
    ir.save(model, path, external_data=f"{path.stem}.data")  # the output keeps its weights external
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    taken = {i.name for i in session.get_inputs()}
    got = dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in taken}), strict=True))
    for name, (axis, pieces) in (split.output_pieces if split is not None else {}).items():
        got[name] = np.concatenate([got.pop(p) for p in pieces], axis=axis)
    return got


def assert_matches_peft(case, out: Path, split=None) -> None:
    """The SHA graph with each written adapter equals the peft model with that adapter active."""
    reference = case.reference()
    inputs = zoo.example_inputs(case.zoo_case)
    for adapter in ADAPTERS:
        got = sha_outputs(out, adapter.name, inputs, split)["logits"]
        want = reference[adapter.name]["logits"]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max() + 1e-6, adapter.name
        assert np.abs(got - reference["default"]["logits"]).max() > 0.1  # the adapter does change the output


def assert_fitted(result, flow: str) -> None:
    fitted = {a.name: a for a in result.adapters.adapters}
    assert set(fitted["french"].padded.values()) == {(4, GRAPH_RANK)} and not fitted["oasst"].padded
    assert set(fitted["tiny"].padded.values()) == {(2, GRAPH_RANK)}
    assert len(fitted["tiny"].zero_filled) == ZERO_FILLED_TINY and not fitted["french"].zero_filled
    if flow == "alpha":
        assert {n: a.scale for n, a in fitted.items()} == {a.name: a.scale for a in ADAPTERS}


QUANTIZED = [
    ("llama", "step", "folded", {}),
    ("llama_gqa", "prefill", "alpha", {}),  # LoRA + GQA: B of k/v cut per KV head
    ("qwen2", "step", "alpha", {}),  # q/k/v biases
    ("llama_gqa", "step", "alpha", {"htp_layout": True}),  # Conv 1x1: every piece transposed
    ("llama", "step", "folded", {"htp_layout": True}),
]


@pytest.mark.skipif(not aimet_available(), reason="aimet-onnx is not installed")
@pytest.mark.parametrize("family, kind, flow, extra", QUANTIZED, ids=lambda v: str(v) if v else "")
def test_adapters_verify_float_and_quantized(family: str, kind: str, flow: str, extra: dict, tmp_path: Path) -> None:
    case = lora_case(family, kind)
    base_model, base_encodings, listing = aimet_adapter_encodings(case, tmp_path, flow)
    options = ConvertOptions(
        encodings=str(base_encodings),
        lora_adaptor_list=str(listing),
        lora_alpha_from_input=flow == "alpha",
        strict_encodings=True,
        **extra,
    )
    out = tmp_path / "out"
    result = convert(base_model, out, options=options)

    assert result.verification is not None and result.verification.ok
    checks = {c.name: c for c in result.verify.adapters}
    assert set(checks) == {a.name for a in ADAPTERS}
    for check in checks.values():
        assert check.float.ok and check.float.max_rel_err <= 1e-5
        assert check.max_lsb is not None
        worst = check.qdq_local.worst.lsb if check.qdq_local and check.qdq_local.worst else check.max_lsb
        assert worst <= 1.0, (check.name, check.qdq_lsb)
    assert_fitted(result, flow)
    for adapter in result.adapters.adapters:
        assert adapter.coverage is not None and adapter.coverage.ok
    if kind == "prefill" and family == "llama_gqa":  # k/v B per KV head (2), q B per head (8)
        pieces = {k.rsplit("self_attn.", 1)[1]: len(v) for k, v in result.adapters.adapters[0].name_map.items()
                  if ".layers.0." in k}  # fmt: skip
        assert pieces["k_proj.lora_B.weight"] == pieces["v_proj.lora_B.weight"] == 2
        assert pieces["q_proj.lora_B.weight"] == 8 and pieces["q_proj.lora_A.weight"] == 1

    # the files: one folder per adapter, the list read back, encodings of the SHA graph per adapter
    entries = read_adapter_list(out / "adapters.yaml")
    assert [e.name for e in entries] == [a.name for a in ADAPTERS]
    sha = ir.load(out / "model.onnx")
    updatable = (out / "adapters" / "lora_tensor_names.txt").read_text().split()
    base_sha = load_encodings(out / "model.encodings")
    differs = 0
    for entry in entries:
        tensors = load_file(str(entry.weights))
        assert sorted(tensors) == sorted(updatable)
        for name, value in tensors.items():
            assert tuple(value.shape) == tuple(sha.graph.initializers[name].shape)
        assert entry.encodings is not None
        own = load_encodings(entry.encodings, model=sha)
        assert set(own.names()) == set(base_sha.names())
        differs += sum(not own.get(n).same_numbers(base_sha.get(n)) for n in updatable if n in own)
        names = json.loads((out / "adapters" / entry.name / f"{entry.name}.names.json").read_text())
        assert sorted(p for ps in names["tensors"].values() for p in ps) == sorted(updatable)
    assert differs > 0  # the adapters' own encodings, not the base graph's
    report = json.loads((out / "model.report.json").read_text())
    assert len(report["adapters_verification"]) == len(ADAPTERS)
    assert_matches_peft(case, out)


@pytest.mark.parametrize(
    "family, kind, as_inputs, flow, extra",
    [
        ("llama", "step", True, "folded", {}),  # LoRA weights as graph inputs: kept whole, cut in the graph
        ("llama_gqa", "step", False, "alpha", {"optimize_o_proj": True}),  # o_proj's A by input rows
        ("llama_gqa", "step", False, "alpha", {"verify": "blocks"}),
        ("qwen2", "prefill", False, "folded", {"htp_layout": True, "optimize_o_proj": True}),
        ("llama_gqa", "step", False, "alpha", {"per_head_kv_io": True}),  # k/v B per KV head in a step
    ],
    ids=["graph-inputs", "optimize-o-proj", "blocks", "qwen2-prefill-htp-o-proj", "per-head-kv-io"],
)
def test_adapters_float(family: str, kind: str, as_inputs: bool, flow: str, extra: dict, tmp_path: Path) -> None:
    case = lora_case(family, kind, as_inputs=as_inputs)
    options = ConvertOptions(lora_adaptor_list=str(case.yaml(flow)), lora_alpha_from_input=flow == "alpha", **extra)
    out = tmp_path / "out"
    result = convert(case.model, out, options=options)

    assert result.verification is not None and result.verification.ok
    assert [c.float.ok for c in result.verify.adapters] == [True] * len(ADAPTERS)
    assert all(c.note == "no encodings" for c in result.verify.adapters)
    assert_fitted(result, flow)
    name_map = result.adapters.adapters[0].name_map
    o_proj_a = next(v for k, v in name_map.items() if ".layers.0.self_attn.o_proj.lora_A" in k)
    heads = zoo.case_info(case.zoo_case).heads
    assert len(o_proj_a) == (heads if extra.get("optimize_o_proj") else 1)
    if as_inputs:
        graph_inputs = {v.name for v in ir.load(out / "model.onnx").graph.inputs}
        assert set(result.adapters.sha_tensors) <= graph_inputs
    if extra.get("verify") == "blocks":
        assert {c.mode for c in result.verify.adapters} == {"blocks"}
    if extra.get("per_head_kv_io"):
        k_b = next(v for k, v in name_map.items() if ".layers.0.self_attn.k_proj.lora_B" in k)
        assert len(k_b) == zoo.case_info(case.zoo_case).kv_heads
    assert_matches_peft(case, out, result.split)


def test_a_wrongly_cut_adapter_fails_and_nothing_is_written(tmp_path: Path, monkeypatch) -> None:
    """Each head given its mirror head's rows of B: the per-adapter verification names the adapter."""
    from mha2sha.adapters import fit

    original = fit._piece

    def mirrored(array: np.ndarray, ranges):
        return original(array, tuple((a, array.shape[a] - stop, array.shape[a] - start) for a, start, stop in ranges))

    monkeypatch.setattr(fit, "_piece", mirrored)
    case = lora_case("llama")
    out = tmp_path / "out"
    with pytest.raises(ConversionFailed, match="adapter 'french': verification failed"):
        convert(case.model, out, options=ConvertOptions(lora_adaptor_list=str(case.yaml())))
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.skipif(not aimet_available(), reason="aimet-onnx is not installed")
def test_encodings_at_the_adapters_own_rank_are_padded(tmp_path: Path) -> None:
    """aimet-onnx's LoRA flow calibrates each adapter at its own rank: its per-channel A encodings
    have r channels; they are padded to the graph's rank with the weights."""
    case = lora_case("llama")
    base_model, base_encodings, listing = aimet_adapter_encodings(case, tmp_path, "folded")
    import yaml

    doc = yaml.safe_load(listing.read_text())
    french = next(e for e in doc["lora_adaptor_list"] if e["name"] == "french")
    encodings = json.loads(Path(french["encodings_path"]).read_text())
    cut = 0
    for entry in encodings["param_encodings"]:
        if ".lora_A." in entry["name"] and len(entry["scale"]) == GRAPH_RANK:
            entry["scale"], entry["offset"] = entry["scale"][:4], entry["offset"][:4]
            cut += 1
    assert cut
    french["encodings_path"] = str(tmp_path / "french_rank4.encodings")
    Path(french["encodings_path"]).write_text(json.dumps(encodings))
    listing.write_text(yaml.safe_dump(doc))
    options = ConvertOptions(encodings=str(base_encodings), lora_adaptor_list=str(listing), strict_encodings=True)
    result = convert(base_model, tmp_path / "out", options=options)
    check = next(c for c in result.verify.adapters if c.name == "french")
    assert check.float.ok and check.max_lsb is not None and check.max_lsb <= 1.0
    written = load_encodings(tmp_path / "out" / "adapters" / "french" / "french.encodings")
    a = next(n for n in written.params if ".lora_A." in n)
    assert written.params[a].num_channels == GRAPH_RANK


@pytest.mark.skipif(not aimet_available(), reason="aimet-onnx is not installed")
def test_lora_only_encodings_as_aimet_onnx_exports_them(tmp_path: Path) -> None:
    """aimet-onnx's LoRA flow freezes the base quantizers and writes, per adapter, only the LoRA
    quantizers' encodings as a bare ``{name: 1.0.0 entry}`` map: they take the base's place by name,
    and the adapter's written encodings hold just those (per head), lora_alpha included."""
    import yaml

    case = lora_case("llama_gqa")
    base_model, base_encodings, listing = aimet_adapter_encodings(case, tmp_path, "alpha")
    doc = yaml.safe_load(listing.read_text())
    for entry in doc["lora_adaptor_list"]:
        full = json.loads(Path(entry["encodings_path"]).read_text())
        lora_only = {e["name"]: {k: v for k, v in e.items() if k != "name"}
                     for section in ("activation_encodings", "param_encodings") for e in full[section]
                     if ".lora_" in e["name"] or "/default" in e["name"]}  # fmt: skip
        assert lora_only
        entry["encodings_path"] = str(tmp_path / f"{entry['name']}_lora.encodings")
        Path(entry["encodings_path"]).write_text(json.dumps(lora_only))
    listing.write_text(yaml.safe_dump(doc))
    options = ConvertOptions(
        encodings=str(base_encodings), lora_adaptor_list=str(listing), lora_alpha_from_input=True, strict_encodings=True
    )
    out = tmp_path / "out"
    result = convert(base_model, out, options=options)
    for check in result.verify.adapters:
        assert check.float.ok and check.max_lsb is not None
        worst = check.qdq_local.worst.lsb if check.qdq_local and check.qdq_local.worst else check.max_lsb
        assert worst <= 1.0, (check.name, check.qdq_lsb)
    base_sha = load_encodings(out / "model.encodings")
    for adapter in result.adapters.adapters:
        written = load_encodings(out / "adapters" / adapter.name / f"{adapter.name}.encodings")
        assert "lora_alpha" in written.activations and len(written) < len(base_sha) / 2
        assert all(".lora_" in n or "/default" in n or n == "lora_alpha" for n in written.names())
