"""Write full-size random-weight LLM step graphs without ever holding the weights in memory.

How:
1. Build the HF model on ``torch.device("meta")`` (no storage at all) and export it with
   ``torch.onnx.export(..., dynamo=True, optimize=False)``: ``torch.export`` traces meta tensors
   fine; only the onnxscript optimizer (constant folding) needs real data, so it is run later.
2. Every parameter initializer gets a *poison* lazy tensor (raises if anything reads it) and every
   ``Transpose(weight)`` the exporter emits for ``nn.Linear`` is folded by hand into a weight of the
   transposed shape (the values are random anyway, so nothing needs transposing). Then the
   onnxscript optimizer runs, exactly as ``optimize=True`` would; the poison proves it read no
   weight.
3. Poison tensors become seeded ``ir.LazyTensor`` s (``torch.randn`` from a generator seeded by the
   weight's name; N(0, 1/fan_in) for projections, N(0, 1) for embeddings, 1 + 0.1 N for norms,
   0.02 N for biases) and ``ir.save(..., external_data=...)`` streams them, one tensor at a time
   (bounded by ``max_in_flight_bytes``), into ONE external data file.
   Non-parameter buffers (RoPE ``inv_freq``) get their real values from a CPU rotary module.

Styles:
- ``hf``: HF KV step as the zoo's ``CausalLMStep`` exports it: ``input_ids [1,AR]``, 2-D int64
  ``attention_mask [1,CL]``, ``position_ids [1,AR]``, ``past_key_{l}/past_value_{l}
  [1,Hkv,CL-AR,D]`` in, ``logits`` + ``present_key_{l}/present_value_{l}`` (= concat) out.
- ``prepared``: Qualcomm-prepared step (the zoo's ``PreparedLlamaStep``): additive float mask
  ``[1,1,AR,CL]``, RoPE ``position_ids_cos/sin [1,1,AR,D/2]`` inputs, transposed key cache
  ``past_key_{l}_in [1,Hkv,D,CL-AR]``, only the new entries returned.
- ``prepared-conv``: the same with every projection already a Conv 1x1 on ``[1, C, 1, AR]`` (BD1L, as
  Qualcomm's HTP preparation writes them; mha2sha's own HTP layout passes applied to the MHA graph,
  the transposed weights streamed like the others).

``--part`` drops the embedding and the LM head, as prepared models split into parts are:
``inputs_embeds [1, AR, hidden]`` in, the last layer's ``hidden_states`` out (with the KV outputs).

Default step: AR = 128 tokens, CL = 1024 (Qualcomm AI Hub's Llama-v2-7B-Chat prompt processor).

    python benchmarks/generate.py llama2-7b -o /tmp/bench --dtype fp16 [--style hf] [--layers 2]
    python benchmarks/generate.py qwen2.5-1.5b -o /tmp/bench --style prepared-conv --dtype fp32 --layers 5 --part --ar 32

The folder is ``<shape>[-<N>l][-part][-ar<AR>][-cl<CL>]-<style>-<dtype>`` (AR/CL only when not the
defaults 128 / 1024).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import math
import os
import sys
import time
import zlib
from pathlib import Path

import onnx_ir as ir

__all__ = ["SHAPES", "LLMShape", "generate", "model_dir_name"]

logger = logging.getLogger("benchmarks.generate")


@dataclasses.dataclass(frozen=True)
class LLMShape:
    config: str  # transformers config class
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float = 10000.0
    tied: bool = False
    head_dim: int | None = None
    extra: tuple[tuple[str, object], ...] = ()

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads


SHAPES: dict[str, LLMShape] = {
    "llama2-7b": LLMShape("LlamaConfig", 4096, 11008, 32, 32, 32, 32000),
    "llama3-8b": LLMShape("LlamaConfig", 4096, 14336, 32, 32, 8, 128256, 500000.0),
    "llama3.2-3b": LLMShape("LlamaConfig", 3072, 8192, 28, 24, 8, 128256, 500000.0, tied=True),
    "llama3.2-1b": LLMShape("LlamaConfig", 2048, 8192, 16, 32, 8, 128256, 500000.0, tied=True, head_dim=64),
    "qwen2.5-1.5b": LLMShape(
        "Qwen2Config",
        1536,
        8960,
        28,
        12,
        2,
        151936,
        1000000.0,
        tied=True,
        extra=(("use_sliding_window", False),),
    ),
}

DTYPES = {"fp16": "float16", "fp32": "float32"}
_EAGER_ELEMENTS = 1 << 20  # parameters up to this size are drawn eagerly (norms, biases)
STYLES = ("hf", "prepared", "prepared-conv")
DEFAULT_AR, DEFAULT_CONTEXT = 128, 1024


def model_dir_name(
    shape: str,
    style: str,
    dtype: str,
    layers: int | None,
    lora_rank: int | None = None,
    *,
    part: bool = False,
    ar: int = DEFAULT_AR,
    context: int = DEFAULT_CONTEXT,
) -> str:
    cut = f"-{layers}l" if layers is not None else ""
    cut += "-part" if part else ""
    cut += f"-ar{ar}" if ar != DEFAULT_AR else ""
    cut += f"-cl{context}" if context != DEFAULT_CONTEXT else ""
    lora = f"-lora{lora_rank}" if lora_rank else ""
    return f"{shape}{cut}-{style}-{dtype}{lora}"


def parse_dir_name(name: str) -> dict:
    """``model_dir_name``'s inverse: generate() keyword arguments (shape, style, dtype, ...)."""
    kw: dict = {}
    base, sep, rank = name.rpartition("-lora")
    if sep and rank.isdigit():
        name, kw["lora_rank"] = base, int(rank)
    for style in sorted(STYLES, key=len, reverse=True):
        head, sep, dtype = name.rpartition(f"-{style}-")
        if sep and dtype in DTYPES:
            break
    else:
        raise ValueError(f"not a generated model name: {name}")
    tokens = head.split("-")
    kw.update(style=style, dtype=dtype)
    while len(tokens) > 1:
        last = tokens[-1]
        if last == "part":
            kw["part"] = True
        elif last.startswith("ar") and last[2:].isdigit():
            kw["ar"] = int(last[2:])
        elif last.startswith("cl") and last[2:].isdigit():
            kw["context"] = int(last[2:])
        elif last.endswith("l") and last[:-1].isdigit():
            kw["layers"] = int(last[:-1])
        else:
            break
        tokens.pop()
    kw["shape_name"] = "-".join(tokens)
    return kw


# ----------------------------------------------------------------------------- torch side


def _config(shape: LLMShape, layers: int):
    import transformers

    kw: dict[str, object] = dict(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        max_position_embeddings=8192,
        tie_word_embeddings=shape.tied,
        rope_theta=shape.rope_theta,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if shape.head_dim:
        kw["head_dim"] = shape.head_dim
    kw.update(dict(shape.extra))
    config = getattr(transformers, shape.config)(**kw)
    config._attn_implementation = "eager"
    return config


def _prepared_part(hf):
    """``PreparedLlamaStep`` without embedding and LM head: hidden states in, hidden states out."""
    import torch

    from mha2sha.zoo.prepared import PreparedLlamaStep, rope_halves

    class PreparedPart(PreparedLlamaStep):
        def forward(self, inputs_embeds, attention_mask, position_ids_cos, position_ids_sin, *past):
            h, ar = inputs_embeds, inputs_embeds.shape[1]
            new_kv = []
            for i, layer in enumerate(self.layers):
                attn = layer.self_attn
                x = layer.input_layernorm(h)
                q = attn.q_proj(x).view(1, ar, self.heads, self.head_dim).transpose(1, 2)
                k = attn.k_proj(x).view(1, ar, self.kv_heads, self.head_dim).transpose(1, 2)
                v = attn.v_proj(x).view(1, ar, self.kv_heads, self.head_dim).transpose(1, 2)
                q = rope_halves(q, position_ids_cos, position_ids_sin)
                k_t = rope_halves(k, position_ids_cos, position_ids_sin).transpose(2, 3)  # [1, Hkv, D, AR]
                keys = torch.cat([past[2 * i], k_t], dim=3)
                values = torch.cat([past[2 * i + 1], v], dim=2)
                rep = self.heads // self.kv_heads
                scores = torch.matmul(q, self.repeat_kv(keys, rep)) * self.scale + attention_mask
                probs = torch.softmax(scores, dim=-1)
                ctx = torch.matmul(probs, self.repeat_kv(values, rep))
                ctx = ctx.transpose(1, 2).reshape(1, ar, self.heads * self.head_dim)
                h = h + attn.o_proj(ctx)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
                new_kv += [k_t, v]
            return (h, *new_kv)

    module = PreparedPart(hf)
    del module.embed, module.lm_head, module.norm
    return module


def _example_inputs(
    shape: LLMShape, style: str, layers: int, ar: int, context: int, dtype, part: bool = False
):
    import torch

    past = context - ar
    d, hkv = shape.dim, shape.kv_heads
    inputs: dict[str, torch.Tensor] = {"input_ids": torch.zeros(1, ar, dtype=torch.int64)}
    outputs = ["logits"]
    if part:
        inputs = {"inputs_embeds": torch.zeros(1, ar, shape.hidden, dtype=dtype)}
        outputs = ["hidden_states"]
    if style == "hf":
        inputs["attention_mask"] = torch.ones(1, context, dtype=torch.int64)
        inputs["position_ids"] = torch.arange(past, context)[None]
        for layer in range(layers):
            inputs[f"past_key_{layer}"] = torch.zeros(1, hkv, past, d, dtype=dtype)
            inputs[f"past_value_{layer}"] = torch.zeros(1, hkv, past, d, dtype=dtype)
            outputs += [f"present_key_{layer}", f"present_value_{layer}"]
    else:
        inputs["attention_mask"] = torch.zeros(1, 1, ar, context, dtype=dtype)
        inputs["position_ids_cos"] = torch.zeros(1, 1, ar, d // 2, dtype=dtype)
        inputs["position_ids_sin"] = torch.zeros(1, 1, ar, d // 2, dtype=dtype)
        for layer in range(layers):
            inputs[f"past_key_{layer}_in"] = torch.zeros(1, hkv, d, past, dtype=dtype)
            inputs[f"past_value_{layer}_in"] = torch.zeros(1, hkv, past, d, dtype=dtype)
            outputs += [f"past_key_{layer}_out", f"past_value_{layer}_out"]
    return inputs, outputs


def export_meta(
    shape: LLMShape,
    style: str,
    layers: int,
    ar: int,
    context: int,
    dtype: str,
    lora_rank: int | None = None,
    part: bool = False,
):
    """Export the graph of a meta-device model: initializers carry shapes, no data. With
    ``lora_rank`` the model carries an unmerged peft LoRA of that rank (alpha = 2 * rank) on
    q/k/v/o_proj, whose A and B keep their parameter names as initializers.

    Returns (ir.Model, {buffer name: real numpy value}).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from mha2sha.zoo.decoders import CausalLMStep
    from mha2sha.zoo.export import quiet_export
    from mha2sha.zoo.prepared import PreparedLlamaStep

    torch_dtype = getattr(torch, DTYPES[dtype])
    config = _config(shape, layers)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(torch_dtype).eval()
        if lora_rank:
            import warnings

            from peft import LoraConfig, get_peft_model

            targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
            lora = LoraConfig(target_modules=targets, r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hf = get_peft_model(hf, lora).base_model.model.to(torch_dtype).eval()
    if part and style == "hf":
        raise ValueError("--part is a prepared-style graph")
    module = (
        CausalLMStep(hf, layers, True)
        if style == "hf"
        else _prepared_part(hf)
        if part
        else PreparedLlamaStep(hf)
    )
    module.eval()
    # Buffers (RoPE inv_freq) are not weights: compute their real values on the CPU.
    rotary = type(hf.model.rotary_emb)(config=config)
    buffers = {}
    for name, buf in module.named_buffers():
        short = name.rsplit(".", 1)[-1]
        real = getattr(rotary, short, None)
        if real is None:
            raise RuntimeError(f"no real value for buffer {name}")
        buffers[name] = real.to(buf.dtype).numpy()
    inputs, outputs = _example_inputs(shape, style, layers, ar, context, torch_dtype, part)
    meta_inputs = tuple(v.to("meta") for v in inputs.values())
    with torch.no_grad(), quiet_export():
        program = torch.onnx.export(
            module,
            meta_inputs,
            input_names=list(inputs),
            output_names=outputs,
            dynamo=True,
            optimize=False,
            verbose=False,
        )
    return program.model, buffers


# ----------------------------------------------------------------------------- onnx side


class _Poison:
    """Lazy tensor body that must never run: proves the optimizer read no weight."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self):
        raise RuntimeError(f"weight {self.name} was read during graph optimisation")


def _fold_weight_transposes(graph: ir.Graph, params: set[str]) -> None:
    """``Transpose(W)`` of a 2-D parameter -> a parameter of the transposed shape (values are random)."""
    for node in list(graph):
        if node.op_type != "Transpose" or node.inputs[0] is None:
            continue
        src = node.inputs[0]
        if src.name not in params or src.shape is None or len(src.shape) != 2:
            continue
        perm = node.attributes["perm"].as_ints() if "perm" in node.attributes else [1, 0]
        if list(perm) != [1, 0]:
            continue
        only_use = len(src.uses()) == 1
        name = src.name if only_use else f"{src.name}.T"
        dims = [src.shape[1], src.shape[0]]
        new = ir.Value(name=name + ".tmp", shape=ir.Shape(dims), type=src.type)
        new.const_value = ir.LazyTensor(_Poison(name), src.dtype, ir.Shape(dims), name=name)
        node.outputs[0].replace_all_uses_with(new, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if only_use:
            del graph.initializers[src.name]
        new.name = name
        graph.register_initializer(new)
        params.add(name)


def _fan_in(value: ir.Value) -> int:
    for node, index in value.uses():
        if node.op_type in ("MatMul", "Gemm") and index == 1:
            return int(value.shape[-2])
    return int(value.shape[-1]) if value.shape and len(value.shape) >= 2 else 1


def _seed(name: str, seed: int) -> int:
    return (zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


class _RandomWeight:
    """``std * N(0, 1) + mean`` of a fixed shape, from a generator seeded by the weight's name."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str, std: float, mean: float, seed: int):
        self.args = (name, shape, dtype, std, mean, seed)

    def __call__(self) -> ir.Tensor:
        import torch

        name, shape, dtype, std, mean, seed = self.args
        gen = torch.Generator().manual_seed(_seed(name, seed))
        t = torch.randn(shape, generator=gen, dtype=getattr(torch, dtype))
        t.mul_(std)
        if mean:
            t.add_(mean)
        return ir.Tensor(t.numpy(), name=name)


def _attach_random_weights(graph: ir.Graph, params: set[str], seed: int) -> int:
    total = 0
    for name in sorted(params):
        value = graph.initializers.get(name)
        if value is None or not value.uses():
            if value is not None:
                del graph.initializers[name]
            continue
        shape = tuple(int(d) for d in value.shape)
        dtype = value.dtype.numpy().name
        lname = name.lower()
        if "norm" in lname and len(shape) == 1:
            std, mean = 0.1, 1.0
        elif lname.endswith("bias"):
            std, mean = 0.02, 0.0
        elif any(n.op_type == "Gather" for n, _ in value.uses()):
            std, mean = 1.0, 0.0
        else:
            std, mean = 1.0 / math.sqrt(_fan_in(value)), 0.0
        value.const_value = ir.LazyTensor(
            _RandomWeight(name, shape, dtype, std, mean, seed), value.dtype, ir.Shape(shape), name=name
        )
        total += value.const_value.nbytes
    return total


def generate(
    shape_name: str,
    out_dir: str | os.PathLike,
    *,
    style: str = "hf",
    dtype: str = "fp16",
    layers: int | None = None,
    ar: int = DEFAULT_AR,
    context: int = DEFAULT_CONTEXT,
    seed: int = 0,
    workers: int = 2,
    lora_rank: int | None = None,
    part: bool = False,
) -> Path:
    """Write ``out_dir/<model_dir_name>/model.onnx`` + ``model.data``; returns the .onnx path."""
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    from mha2sha.zoo.export import quiet_export

    shape = SHAPES[shape_name]
    n_layers = shape.layers if layers is None else layers
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, not {style!r}")
    name = model_dir_name(shape_name, style, dtype, layers, lora_rank, part=part, ar=ar, context=context)
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    t0 = time.perf_counter()
    model, buffers = export_meta(shape, style, n_layers, ar, context, dtype, lora_rank, part)
    t_export = time.perf_counter() - t0

    graph = model.graph
    params: set[str] = set()
    for name, value in list(graph.initializers.items()):
        if name in buffers:
            value.const_value = ir.tensor(buffers[name], name=name)
        elif math.prod(value.shape) <= _EAGER_ELEMENTS:
            # Small parameters (norm weights, biases) are drawn now: the optimizer's rewriter
            # reads them to match patterns.
            params.add(name)
            _attach_random_weights(graph, {name}, seed)
            value.const_value = ir.tensor(value.const_value.numpy(), name=name)
            params.discard(name)
        else:
            value.const_value = ir.LazyTensor(_Poison(name), value.dtype, ir.Shape(value.shape), name=name)
            params.add(name)
    _fold_weight_transposes(graph, params)
    with quiet_export():
        onnxscript.optimizer.optimize_ir(model)
        onnxscript.rewriter.onnx_fusions.fuse(model)
    weight_bytes = _attach_random_weights(graph, params, seed)
    if style == "prepared-conv":  # projections as Conv 1x1 on [1, C, 1, AR]; weights transposed lazily
        from mha2sha.io.prepare import prepare_for_split, remove_unused_initializers
        from mha2sha.layout import apply_htp_layout

        prepare_for_split(model)
        apply_htp_layout(model)
        remove_unused_initializers(model)
    t_graph = time.perf_counter() - t0

    data = path.with_suffix(".data")
    ir.save(model, path, external_data=data.name, max_workers=workers, alignment=4096)
    t_total = time.perf_counter() - t0
    meta = {
        "shape": shape_name,
        "config": dataclasses.asdict(shape),
        "style": style,
        "dtype": dtype,
        "layers": n_layers,
        "ar": ar,
        "context": context,
        "part": part,
        "seed": seed,
        "lora_rank": lora_rank,
        "weight_bytes": weight_bytes,
        "largest_tensor_mb": round(
            max(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
            / 2**20
        ),
        "files_bytes": path.stat().st_size + data.stat().st_size,
        "nodes": len(graph),
        "ops": dict(collections.Counter(n.op_type for n in graph).most_common()),
        "seconds": {"export": round(t_export, 2), "graph": round(t_graph, 2), "total": round(t_total, 2)},
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("-o", "--out", required=True, help="folder; the model goes to <out>/<name>/model.onnx")
    p.add_argument("--style", choices=STYLES, default="hf")
    p.add_argument("--part", action="store_true", help="no embedding / LM head: hidden states in and out")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--layers", type=int, help="cut the model to this many layers (full width)")
    p.add_argument("--ar", type=int, default=DEFAULT_AR, help="tokens per step (default 128)")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="context length CL (default 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="threads drawing/writing weights")
    p.add_argument("--lora-rank", type=int, help="an unmerged peft LoRA of this rank on q/k/v/o_proj")
    args = p.parse_args(argv)
    path = generate(
        args.shape,
        args.out,
        style=args.style,
        dtype=args.dtype,
        layers=args.layers,
        ar=args.ar,
        context=args.context,
        seed=args.seed,
        workers=args.workers,
        lora_rank=args.lora_rank,
        part=args.part,
    )
    print(path)
    print((path.parent / "meta.json").read_text())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
