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

# graph id -> the converter's current failure (exit code: what happened), as the test words it.
# Strict xfail: delete a line when its graph converts.
KNOWN_FAILING: dict[str, str] = {}

# graph id -> what the converter must say when it refuses the graph by design (exit 1, one line).
# Merged seq2seq decoders keep both decoders inside If branches; the same decoders are written
# unmerged by optimum (decoder_model.onnx / decoder_with_past_model.onnx), which convert.
REFUSED: dict[str, str] = {
    "optimum_whisper_sdpa_decoder_merged": "inside the If subgraphs",
    "optimum_whisper_eager_decoder_merged": "inside the If subgraphs",
    "optimum_t5_eager_decoder_merged": "inside the If subgraphs",
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
    """Live attention cores in the graph (``If`` branches included): every Softmax (no corpus model
    has a softmax outside attention) and every fused attention op whose attention output (its first
    output) reaches a graph output. genai's builder leaves the last layer's attention of a 2-layer
    Phi-3 unread (only its present KV outputs are used), so a converter rightly drops it."""
    import onnx

    model = onnx.load(str(_path(graph)), load_external_data=False)

    def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
        return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]

    def count(g: onnx.GraphProto) -> int:
        readers: dict[str, list[onnx.NodeProto]] = {}
        for node in g.node:
            names = list(node.input) + [i for sub in subgraphs(node) for n in sub.node for i in n.input]
            for name in names:
                if name:  # "" is an omitted optional input, not a value
                    readers.setdefault(name, []).append(node)
        outputs = {o.name for o in g.output}

        def reaches_output(name: str) -> bool:
            stack, seen = [name], set()
            while stack:
                value = stack.pop()
                if value in outputs:
                    return True
                for node in readers.get(value, []):
                    if id(node) not in seen:
                        seen.add(id(node))
                        stack += [o for o in node.output if o]
            return False

        total = 0
        for node in g.node:
            if (node.op_type == "Softmax" or node.op_type.endswith("Attention")) and reaches_output(node.output[0]):
                total += 1
            if subgraphs(node) and any(reaches_output(o) for o in node.output):
                total += sum(count(sub) for sub in subgraphs(node))
        return total

    return count(model.graph)


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


@pytest.mark.parametrize("graph", [g for g in _params(with_known_failing=True) if g.id not in REFUSED])
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


@pytest.mark.parametrize("graph", [g for g in GRAPHS if g.id in REFUSED], ids=lambda g: g.id)
def test_refused_by_design(graph: tp.CorpusGraph, tmp_path: Path, capsys, monkeypatch) -> None:
    """Exit 1, the reason in the blocks table, no traceback, nothing written."""
    monkeypatch.setenv("COLUMNS", "1000")
    out = tmp_path / "out"
    code = main(["convert", str(_path(graph)), "-o", str(out), *graph.input_shape_args()])
    captured = capsys.readouterr()
    assert code == 1, captured.out + captured.err
    assert REFUSED[graph.id] in " ".join(captured.out.split()) and "Traceback" not in captured.out + captured.err
    assert not out.exists() or not any(out.iterdir())
