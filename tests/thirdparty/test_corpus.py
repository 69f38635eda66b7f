"""The third-party graph corpus: graphs written by other tools, run and converted.

(a)+(b) every corpus graph builds (its tool's venv and export, cached) and runs in onnxruntime CPU
on consistent inputs: this checks the corpus itself. Only a tool that cannot be installed on the
machine skips, with pip's reason.

(c) ``mha2sha convert`` on every graph, through ``mha2sha.cli.main`` with ``--input-shape`` for
the dynamic inputs and the same inputs (``--inputs``): it must exit 0, verify (original vs
converted outputs in onnxruntime) and split every attention block: at least one, all the blocks it
reports, and as many as the graph has attention cores (Softmax / fused attention ops, ``If``
branches included), so a block the converter never saw fails too. Each run is
recorded in ``$MHA2SHA_CACHE/thirdparty/results/<id>.json`` (exit code, last stderr line, the
report's blocks and verification). Graphs the converter does not handle yet are in
``KNOWN_FAILING`` with the exact current failure: strict xfail, so a graph that starts passing
fails the run until its line is deleted.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import onnxruntime as ort  # noqa: E402

from mha2sha.cli import main  # noqa: E402
from mha2sha.zoo import thirdparty as tp  # noqa: E402
from mha2sha.zoo.thirdparty.tools import outputs_root  # noqa: E402

GRAPHS = tp.thirdparty_graphs()

# The converter's current failures, as the test words them (exit code: what happened). Causes:
# - NO_ATTENTION_FOUND: SDPA decomposed by TorchScript / dynamo < 23 puts Where(IsNaN(p), 0, p)
#   between Softmax and MatMul(P, V), so no anchor is found; merged seq2seq decoders keep their
#   attention inside If branches. Exit 0 with nothing written: a silent non-conversion. In the
#   Whisper decoder only the (unmasked) cross-attention is found: SELF_ATTENTION_NOT_SEEN.
# - *_ATTENTION / MS_GQA: fused attention ops (ONNX Attention-23, com.microsoft Attention,
#   MultiHeadAttention, GroupQueryAttention) are refused until they are lowered.
# - "single-head": the attention output shape stayed unknown after prepare (ORT-optimized graphs),
#   and find.anchors.head_spec_of_output reads an unknown shape as one head: exit 0, block not split.
NO_ATTENTION_FOUND = "exit 0: No attention found (no Softmax feeding a MatMul with V); nothing written."
SELF_ATTENTION_NOT_SEEN = "exit 0: 2 of 4 attention blocks found (all split), the others not seen"
ONNX_ATTENTION = (
    "exit 1: 2 of 2 blocks not split: unsupported (fused Attention op: lower it to MatMul/Softmax first)"
)
MS_GQA = "exit 1: 2 of 2 blocks not split: unsupported (fused com.microsoft.GroupQueryAttention op: lower it to MatMul/Softmax first)"
MS_ATTENTION = "exit 1: 2 of 2 blocks not split: unsupported (fused com.microsoft.Attention op: lower it to MatMul/Softmax first)"

# graph id -> the converter's current failure. Delete a line when its graph converts.
KNOWN_FAILING: dict[str, str] = {
    "zoo_llama_step_sdpa_torchscript": NO_ATTENTION_FOUND,
    "zoo_llama_step_sdpa_dynamo": NO_ATTENTION_FOUND,
    "zoo_llama_step_sdpa_dynamo23": ONNX_ATTENTION,
    "zoo_llama_gqa_step_sdpa_torchscript": NO_ATTENTION_FOUND,
    "zoo_llama_gqa_step_sdpa_dynamo": NO_ATTENTION_FOUND,
    "zoo_llama_gqa_step_sdpa_torchscript20": NO_ATTENTION_FOUND,
    "zoo_llama_gqa_step_sdpa_dynamo18": NO_ATTENTION_FOUND,
    "zoo_llama_gqa_step_sdpa_dynamo23": ONNX_ATTENTION,
    "zoo_llama_gqa_prefill_sdpa_torchscript": NO_ATTENTION_FOUND,
    "zoo_llama_gqa_prefill_sdpa_dynamo": NO_ATTENTION_FOUND,
    "zoo_llama_gqa_prefill_sdpa_dynamo23": ONNX_ATTENTION,
    "zoo_mistral_step_sdpa_torchscript": NO_ATTENTION_FOUND,
    "zoo_mistral_step_sdpa_dynamo": NO_ATTENTION_FOUND,
    "zoo_mistral_step_sdpa_dynamo23": ONNX_ATTENTION,
    "zoo_qwen2_step_sdpa_torchscript": NO_ATTENTION_FOUND,
    "zoo_qwen2_step_sdpa_dynamo": NO_ATTENTION_FOUND,
    "zoo_qwen2_step_sdpa_dynamo23": ONNX_ATTENTION,
    "zoo_qwen3_step_sdpa_torchscript": NO_ATTENTION_FOUND,
    "zoo_qwen3_step_sdpa_dynamo": NO_ATTENTION_FOUND,
    "zoo_qwen3_step_sdpa_dynamo23": ONNX_ATTENTION,
    "zoo_gemma_step_sdpa_torchscript": NO_ATTENTION_FOUND,
    "zoo_gemma_step_sdpa_dynamo": NO_ATTENTION_FOUND,
    "zoo_gemma_step_sdpa_dynamo23": ONNX_ATTENTION,
    "zoo_phi3_step_sdpa_torchscript": NO_ATTENTION_FOUND,
    "zoo_phi3_step_sdpa_dynamo": NO_ATTENTION_FOUND,
    "zoo_phi3_step_sdpa_dynamo23": ONNX_ATTENTION,
    "zoo_phi3_prefill_sdpa_torchscript": NO_ATTENTION_FOUND,
    "zoo_phi3_prefill_sdpa_dynamo": NO_ATTENTION_FOUND,
    "zoo_phi3_prefill_sdpa_dynamo23": ONNX_ATTENTION,
    "zoo_gpt2_step_sdpa_torchscript": NO_ATTENTION_FOUND,
    "zoo_gpt2_step_sdpa_dynamo": NO_ATTENTION_FOUND,
    "zoo_gpt2_step_sdpa_dynamo23": ONNX_ATTENTION,
    "zoo_gpt2_prefill_sdpa_torchscript": NO_ATTENTION_FOUND,
    "zoo_gpt2_prefill_sdpa_dynamo": NO_ATTENTION_FOUND,
    "zoo_gpt2_prefill_sdpa_dynamo23": ONNX_ATTENTION,
    "zoo_opt_step_sdpa_torchscript": NO_ATTENTION_FOUND,
    "zoo_opt_step_sdpa_dynamo": NO_ATTENTION_FOUND,
    "zoo_opt_step_sdpa_dynamo23": ONNX_ATTENTION,
    "zoo_gpt_neox_step_sdpa_torchscript": NO_ATTENTION_FOUND,
    "zoo_gpt_neox_step_sdpa_dynamo": NO_ATTENTION_FOUND,
    "zoo_gpt_neox_step_sdpa_dynamo23": ONNX_ATTENTION,
    "zoo_falcon_step_sdpa_torchscript": NO_ATTENTION_FOUND,
    "zoo_falcon_step_sdpa_dynamo": NO_ATTENTION_FOUND,
    "zoo_whisper_decoder_sdpa_torchscript": SELF_ATTENTION_NOT_SEEN,
    "zoo_whisper_decoder_sdpa_dynamo": SELF_ATTENTION_NOT_SEEN,
    "zoo_whisper_decoder_sdpa_dynamo23": "exit 1: 4 of 4 blocks not split: unsupported (fused Attention op: lower it to MatMul/Softmax first)",
    "optimum_llama_gqa_sdpa_nopast": NO_ATTENTION_FOUND,
    "optimum_llama_gqa_sdpa_past": NO_ATTENTION_FOUND,
    "optimum_qwen2_sdpa_nopast": NO_ATTENTION_FOUND,
    "optimum_qwen2_sdpa_past": NO_ATTENTION_FOUND,
    "optimum_phi3_sdpa_nopast": NO_ATTENTION_FOUND,
    "optimum_phi3_sdpa_past": NO_ATTENTION_FOUND,
    "optimum_gpt2_sdpa_nopast": NO_ATTENTION_FOUND,
    "optimum_gpt2_sdpa_past": NO_ATTENTION_FOUND,
    "optimum_whisper_sdpa_decoder_merged": NO_ATTENTION_FOUND,
    "optimum_whisper_eager_decoder_merged": NO_ATTENTION_FOUND,
    "optimum_t5_eager_decoder_merged": NO_ATTENTION_FOUND,
    "ortopt_bert_eager": MS_ATTENTION,
    "ortopt_bert_sdpa": MS_ATTENTION,
    "ortopt_bert_mha": "exit 1: 2 of 2 blocks not split: unsupported (fused com.microsoft.MultiHeadAttention op: lower it to MatMul/Softmax first)",
    "ortopt_bert_fastgelu": MS_ATTENTION,
    "ortopt_gpt2": "exit 0: 1 of 2 blocks not split: single-head",
    "ortopt_vit": "exit 0: 1 of 2 blocks not split: single-head",
    "ortopt_clip": "exit 1: 3 of 4 blocks not split: single-head; unsupported (fused com.microsoft.Attention op: lower it to MatMul/Softmax first)",
    "ortopt_t5_encoder": "exit 0: 2 of 2 blocks not split: single-head",
    "ortopt_whisper_encoder": MS_ATTENTION,
    "genai_llama": MS_GQA,
    "genai_mistral": MS_GQA,
    "genai_qwen2": MS_GQA,
    "genai_phi3": MS_GQA,
    "genai_gemma": MS_GQA,
}


def _params(with_known_failing: bool) -> list:
    params = []
    for graph in GRAPHS:
        marks = []
        if with_known_failing and graph.id in KNOWN_FAILING:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILING[graph.id]))
        params.append(pytest.param(graph, id=graph.id, marks=marks))
    return params


@pytest.fixture(scope="module", autouse=True)
def _prebuild_tools(request):
    """Build the tools' venvs and outputs in the background while the zoo graphs run first.

    Started only when a selected test needs a tool graph; joined at the end of the module.
    """
    wanted = {
        item.callspec.params["graph"].tool
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "graph" in item.callspec.params
    } - {"zoo"}
    thread = None
    if wanted:
        thread = threading.Thread(target=tp.prebuild, args=(tuple(sorted(wanted)),), daemon=True)
        thread.start()
    yield
    if thread is not None:
        thread.join()


def _path(graph: tp.CorpusGraph) -> Path:
    try:
        return graph.path()
    except tp.ToolUnavailable as e:
        pytest.skip(f"{graph.tool} cannot be installed here: {e}")


@pytest.mark.parametrize("graph", _params(with_known_failing=False))
def test_graph_runs(graph: tp.CorpusGraph) -> None:
    path = _path(graph)
    features = graph.features()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = graph.inputs()
    assert [i.name for i in session.get_inputs()] == list(feeds)
    outputs = session.run(None, feeds)
    for meta, value in zip(session.get_outputs(), outputs, strict=True):
        if np.issubdtype(value.dtype, np.floating):
            assert np.isfinite(value).all(), f"{graph.id}: {meta.name} has non-finite values"
    # the corpus is about attention written by other tools: each graph must have some
    attention = [op for op in features.fused_ops if op.endswith("Attention")]
    assert features.softmax or attention, f"{graph.id}: no attention ({features.summary()})"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _tail_message(stdout: str) -> str:
    """The plain message after the last table (the test sets COLUMNS so nothing wraps)."""
    lines = stdout.splitlines()
    last_table = max((i for i, line in enumerate(lines) if line.startswith(("└", "╰"))), default=-1)
    return " ".join(" ".join(lines[last_table + 1 :]).split())


def _table_blocks(stdout: str) -> list[dict]:
    """The blocks table's rows, for runs that wrote no report (nothing split)."""
    rows = []
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if line.startswith("│") and len(cells) == 6:
            status = {"left as MHA": "unsupported"}.get(cells[1], cells[1])
            rows.append({"block": cells[0], "status": status, "heads": cells[2], "reason": cells[5]})
    return rows


def _expected_blocks(graph: tp.CorpusGraph) -> int:
    """Attention cores in the graph (``If`` branches included): every Softmax (no corpus model has a
    softmax outside attention) and every fused attention op."""
    features = graph.features()
    return features.softmax + sum(n for op, n in features.fused_ops.items() if op.endswith("Attention"))


def _reason(
    code: int, stderr: str, stdout: str, blocks: list[dict], verification: dict, expected: int
) -> str:
    """One line: what the converter did with this graph."""
    if code == 2 or (code != 0 and not blocks):
        return f"exit {code}: {_last_line(stderr) or _tail_message(stdout)}"
    if not blocks:
        return f"exit {code}: {_tail_message(stdout) or _last_line(stderr)}"
    left = [b for b in blocks if b.get("status") != "split"]
    if left:
        why = sorted(
            {
                f"{b.get('status')}" + (f" ({' '.join(str(b['reason']).split())})" if b.get("reason") else "")
                for b in left
            }
        )
        return f"exit {code}: {len(left)} of {len(blocks)} blocks not split: {'; '.join(why)}"
    if len(blocks) < expected:
        return f"exit {code}: {len(blocks)} of {expected} attention blocks found (all split), the others not seen"
    if not verification.get("ok", False):
        bad = [o for o in verification.get("outputs", []) if not o.get("ok")]
        first = f"{bad[0]['name']} max rel err {bad[0].get('max_rel_err')}" if bad else "no verification"
        return f"exit {code}: verification failed: {first}"
    return f"exit {code}: ok" if code == 0 else f"exit {code}: {_last_line(stderr)}"


def _record(graph: tp.CorpusGraph, record: dict) -> None:
    folder = outputs_root() / "results"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{graph.id}.json").write_text(json.dumps(record, indent=2, default=str))


@pytest.mark.parametrize("graph", _params(with_known_failing=True))
def test_convert(graph: tp.CorpusGraph, tmp_path: Path, capsys, monkeypatch) -> None:
    path = _path(graph)
    feeds = tmp_path / "inputs.npz"
    np.savez(feeds, **graph.inputs())
    out = tmp_path / "out"
    argv = ["convert", str(path), "-o", str(out), *graph.input_shape_args(), "--inputs", str(feeds)]
    monkeypatch.setenv("COLUMNS", "1000")  # rich reads it at print time: one line per table row
    start = time.perf_counter()
    try:
        code = main(argv)
    except Exception as e:  # a converter crash is a result too: record it, then fail
        code = -1
        crash = f"crash: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
    else:
        crash = ""
    seconds = round(time.perf_counter() - start, 2)
    captured = capsys.readouterr()
    reports = sorted(out.glob("*.report.json")) if out.is_dir() else []
    report = json.loads(reports[0].read_text()) if reports else None
    blocks = report["blocks"] if report is not None else _table_blocks(captured.out)
    verification = (report or {}).get("verification") or {}
    expected = _expected_blocks(graph)
    reason = crash or _reason(code, captured.err, captured.out, blocks, verification, expected)
    split = sum(b.get("status") == "split" for b in blocks)
    _record(
        graph,
        {
            "id": graph.id,
            "tool": graph.tool_version,
            "features": graph.features().summary(),
            "argv": argv,
            "exit_code": code,
            "reason": reason,
            "stderr_last_line": _last_line(captured.err),
            "stdout_tail": _tail_message(captured.out),
            "report_written": report is not None,
            "attention_in_graph": expected,
            "blocks": blocks,
            "verification": verification,
            "seconds": seconds,
        },
    )
    assert code == 0, reason
    assert report is not None, reason
    assert verification.get("ok") is True, reason
    assert split > 0 and split == len(blocks), reason
    assert len(blocks) >= expected, reason
