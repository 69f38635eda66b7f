"""What N LoRA adapters add to a conversion of a full-size model (``--lora-adaptor-list``).

For a graph written by ``generate.py --lora-rank R`` (an unmerged peft LoRA of rank R on
q/k/v/o_proj), writes N adapters (ranks cycling R/4, R/2, R: most are zero-padded; random values in
the graph's dtype, named and laid out as the graph's LoRA initializers) and a synthetic W8A16 1.0.0
encodings file per adapter (``encodings_gen.py``; the same numbers for each, which costs the same
as AIMET's own): its LoRA weights and LoRA-branch activations, as aimet-onnx's LoRA flow calibrates
per adapter (base quantizers frozen), or with ``--full-encodings`` every tensor's. Then converts
in-process, each run on a warm page cache:

1. ``convert --encodings E --no-verify`` (the base, no adapters),
2. the same with ``--lora-adaptor-list`` (N adapters) [``--lora-alpha-from-input``],

and prints the difference per adapter, total and by phase (loading and checking the adapters, their
encodings propagation, fitting, saving). ``--verify`` also times the per-adapter verification
(whole models or block by block, as ``auto`` decides).

    python benchmarks/lora_adapters.py /tmp/bench/llama3.2-1b-hf-fp16-lora16/model.onnx -n 10 [--alpha]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def _lora_only(encodings: dict, model, lora) -> dict:
    """The entries aimet-onnx's LoRA flow calibrates per adapter: LoRA weights and the activations
    of the LoRA branch (what A, B and the scale compute); the base quantizers stay frozen."""
    produced = set()
    for node in model.graph:
        if any(v is not None and v.name in lora.tensors for v in node.inputs):
            produced.update(o.name for o in node.outputs)
    produced.update(o.name for s in lora.scales for o in s.node.outputs)
    return {
        **encodings,
        "activation_encodings": [e for e in encodings["activation_encodings"] if e["name"] in produced],
        "param_encodings": [e for e in encodings["param_encodings"] if e["name"] in lora.tensors],
    }


def _adapters(model_path: Path, folder: Path, count: int, rank: int, encodings: Path, full: bool, alpha: bool) -> Path:
    import onnx_ir as ir
    import yaml
    from safetensors.numpy import save_file

    from mha2sha.adapters import find_lora

    model = ir.load(model_path)
    candidates = [n for n, v in model.graph.initializers.items() if v.shape is not None and len(v.shape) == 2
                  and rank in tuple(v.shape)]  # fmt: skip
    lora = find_lora(model, candidates)
    tensors = {n: t for n, t in lora.tensors.items() if t.role}
    print(f"{len(tensors)} LoRA tensors ({sum(t.role == 'A' for t in tensors.values())} A), "
          f"{len(lora.scales)} scale sites")  # fmt: skip
    rng = np.random.default_rng(0)
    own = encodings.read_text() if full else json.dumps(_lora_only(json.loads(encodings.read_text()), model, lora))
    entries = []
    for i in range(count):
        r = (rank // 4, rank // 2, rank)[i % 3]
        values = {}
        for name, t in tensors.items():
            shape = list(t.shape)
            shape[t.rank_axis] = r  # type: ignore[index]
            fan_in = shape[0]
            values[name] = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(t.dtype.numpy())
        weights = folder / f"adapter{i}.safetensors"
        save_file(values, str(weights))
        enc = folder / f"adapter{i}.encodings"
        enc.write_text(own)
        entry = {"name": f"adapter{i}", "safetensor_path": weights.name, "encodings_path": enc.name}
        entries.append({**entry, "alpha": float(2 * r)} if alpha else entry)
    listing = folder / "adapters.yaml"
    listing.write_text(yaml.safe_dump({"lora_adaptor_list": entries}, sort_keys=False))
    return listing


def _convert(model: Path, out: Path, **kw):
    from mha2sha.job import ConvertOptions, convert
    from mha2sha.report.progress import PhaseTimer

    timer = PhaseTimer()
    start = time.perf_counter()
    result = convert(model, out, options=ConvertOptions(**kw), timer=timer)
    total = time.perf_counter() - start
    phases = {r.name: r.seconds for r in timer.records}
    return result, total, phases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("-n", "--adapters", type=int, default=10)
    p.add_argument("--rank", type=int, default=16, help="the graph's LoRA rank (generate.py --lora-rank)")
    p.add_argument("--alpha", action="store_true", help="--lora-alpha-from-input")
    p.add_argument("--verify", action="store_true", help="also verify (auto); default --no-verify")
    p.add_argument(
        "--full-encodings",
        action="store_true",
        help="each adapter's encodings name every tensor (default: its LoRA tensors only, as aimet-onnx's LoRA flow)",
    )
    p.add_argument("--work", type=Path, help="folder for adapters and outputs (default: beside the model)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each, alternated (default 2)")
    args = p.parse_args(argv)
    from encodings_gen import synthetic_encodings  # benchmarks/ is on sys.path when run as a script

    work = args.work or args.model.parent / "lora-bench"
    (work / "adapters").mkdir(parents=True, exist_ok=True)
    encodings = work / "base.encodings"
    if not encodings.exists():
        encodings.write_text(json.dumps(synthetic_encodings(args.model)))
    listing = _adapters(
        args.model, work / "adapters", args.adapters, args.rank, encodings, args.full_encodings, args.alpha
    )
    verify = "auto" if args.verify else "none"
    common = {"encodings": str(encodings), "verify": verify}
    with_adapters = {"lora_adaptor_list": str(listing), "lora_alpha_from_input": args.alpha, **common}
    runs: dict[str, list] = {"base": [], "lora": []}
    for _ in range(args.repeat):  # alternated, so both see the same page cache; the fastest counts
        for tag, kw in (("base", common), ("lora", with_adapters)):
            out = work / f"out-{tag}"
            result, seconds, phases = _convert(args.model, out, **kw)
            if tag == "lora":
                written = sum(f.stat().st_size for f in (out / "adapters").rglob("*") if f.is_file())
            shutil.rmtree(out, ignore_errors=True)
            runs[tag].append((seconds, phases, result))
    base_total, base_phases, _ = min(runs["base"], key=lambda r: r[0])
    total, phases, result = min(runs["lora"], key=lambda r: r[0])
    n = args.adapters
    print(f"base: {base_total:.2f} s; with {n} adapters: {total:.2f} s; "
          f"+{total - base_total:.2f} s = {(total - base_total) / n:.3f} s per adapter; "
          f"{written / 1e6:.1f} MB of adapter files")  # fmt: skip
    for name in sorted(set(phases) | set(base_phases), key=lambda k: -abs(phases.get(k, 0) - base_phases.get(k, 0))):
        delta = phases.get(name, 0.0) - base_phases.get(name, 0.0)
        if abs(delta) >= 0.01:
            print(f"  {name:<40} {base_phases.get(name, 0.0):7.2f} -> {phases.get(name, 0.0):7.2f} s  ({delta:+.2f})")
    assert result.adapters is not None and len(result.adapters.adapters) == n
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
