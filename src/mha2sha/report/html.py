"""The HTML report: one self-contained file (inline CSS, a few lines of inline JS to sort tables,
inline SVG drawings; no network, no external file), from the analysis and conversion records.

``analysis_html(record)`` is what ``mha2sha analyze`` writes; ``conversion_html(...)`` what
``mha2sha convert`` writes next to the converted model: the same sections for what it did, plus
verification and timing. Every table is sortable (click a header); every drawing is an SVG of one
attention block of each kind as the graph has it and as one head after the split.
"""

from __future__ import annotations

import datetime
import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

from mha2sha.analyze.record import (
    AnalysisRecord,
    AttentionInfo,
    EncodingsSummary,
    InputInfo,
    ModelFacts,
    OpSupport,
    ProbeRecord,
    StructureRecord,
)
from mha2sha.encodings.propagate import CoverageReport
from mha2sha.layout.record import LayoutRecord
from mha2sha.lower import LowerRecord
from mha2sha.report.progress import PhaseRecord
from mha2sha.report.svg import ROLE_COLOURS, ROLE_NAMES, sketch_svg
from mha2sha.verify.plan import VerifyRecord

__all__ = ["ATTENTION_COLUMNS", "analysis_html", "attention_rows", "conversion_html"]

_CSS = """
:root { --fg:#1d2125; --muted:#5f6b76; --line:#d8dde3; --ok:#1a7f37; --bad:#c62828; --warn:#9a6700; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       margin: 0 auto; padding: 18px 28px 60px; max-width: 1500px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 30px 0 8px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
.muted { color: var(--muted); } code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: 12.5px; }
nav a { margin-right: 14px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; min-width: 150px; }
.card b { display: block; font-size: 20px; }
.ok { color: var(--ok); } .bad { color: var(--bad); } .warn { color: var(--warn); }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f5f7f9; position: sticky; top: 0; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; font-size: 10px; }
table.sortable th[aria-sort=descending]::after { content: " \\25BC"; font-size: 10px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.no td.htp, td.no { color: var(--bad); font-weight: 600; } td.yes { color: var(--ok); } td.unknown { color: var(--muted); }
.problems li { color: var(--bad); } .notes li { color: var(--warn); }
.kind { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; margin: 14px 0; }
.drawings { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.drawing { overflow: auto; max-width: 100%; border: 1px solid #eef0f2; border-radius: 6px; padding: 6px; }
.drawing h4 { margin: 2px 0 6px; font-size: 13px; }
svg.sketch text.l { font: 600 11px system-ui, sans-serif; fill: #111; }
svg.sketch text.d { font: 10px ui-monospace, Menlo, monospace; fill: #444; }
.legend span { display: inline-block; margin: 2px 10px 2px 0; font-size: 12px; }
.legend i { display: inline-block; width: 12px; height: 12px; border: 1px solid #777; border-radius: 2px; margin-right: 4px; vertical-align: -2px; }
details > summary { cursor: pointer; color: var(--muted); }
pre.cmd { background: #f5f7f9; padding: 8px 10px; border-radius: 6px; white-space: pre-wrap; word-break: break-all; }
"""

# Sorting: numbers numerically (a leading number of "12 of 30" counts), text case-insensitively;
# the column's header gets aria-sort so a click again reverses it.
_JS = """
(function () {
  function key(cell) {
    var t = (cell.getAttribute('data-sort') || cell.textContent || '').trim();
    var n = parseFloat(t.replace(/,/g, ''));
    return isNaN(n) ? t.toLowerCase() : n;
  }
  function sortBy(table, col, th) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    rows.sort(function (a, b) {
      var x = key(a.cells[col]), y = key(b.cells[col]);
      if (typeof x !== typeof y) { x = String(x); y = String(y); }
      return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) { c.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.addEventListener('click', function () { sortBy(table, col, th); });
    });
  });
  document.body.setAttribute('data-ready', 'true');
})();
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    table_id: str = "",
    numeric: Iterable[int] = (),
    classes: Sequence[str] | None = None,
    cell_class: dict[int, Any] | None = None,
) -> str:
    """A sortable table; ``numeric`` columns are right-aligned; ``cell_class[col](value)`` adds a class."""
    nums = set(numeric)
    ident = f' id="{_e(table_id)}"' if table_id else ""
    out = [f'<table class="sortable"{ident}><thead><tr>']
    out += [f"<th>{_e(h)}</th>" for h in headers]
    out.append("</tr></thead><tbody>")
    for i, row in enumerate(rows):
        klass = f' class="{_e(classes[i])}"' if classes and classes[i] else ""
        out.append(f"<tr{klass}>")
        for col, value in enumerate(row):
            names = ["num"] if col in nums else []
            if cell_class and col in cell_class:
                names.append(cell_class[col](value))
            attr = f' class="{" ".join(n for n in names if n)}"' if any(names) else ""
            out.append(f"<td{attr}>{_e(value)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _list(items: Sequence[str], klass: str = "") -> str:
    if not items:
        return ""
    return f'<ul class="{klass}">' + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>"


def _card(label: str, value: object, klass: str = "") -> str:
    return f'<div class="card"><b class="{klass}">{_e(value)}</b><span class="muted">{_e(label)}</span></div>'


def _page(title: str, subtitle: str, nav: Sequence[tuple[str, str]], body: str) -> str:
    links = "".join(f'<a href="#{_e(a)}">{_e(t)}</a>' for a, t in nav)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><div class=\"muted\">{_e(subtitle)} · mha2sha · {stamp}</div>"
        f"<nav>{links}</nav>{body}<script>{_JS}</script></body></html>\n"
    )


# ----------------------------------------------------------------------------- sections

#: Columns of the attention table (and attention.csv), with the field each reads.
ATTENTION_COLUMNS = (
    "block", "layer", "kind", "heads", "kv_heads", "head_dim", "seq", "past", "rope", "mask", "kv_cache",
    "packed_qkv", "lora", "fused_op", "would_split", "reason",
)  # fmt: skip


def attention_rows(blocks: Sequence[AttentionInfo]) -> list[list[object]]:
    rows = []
    for b in blocks:
        reason = b.reason if not b.would_split else "; ".join(b.features)
        row: list[object] = [
            b.name, b.layer, b.kind, b.heads or "", b.kv_heads or "", b.head_dim or "", b.seq or "",
            "" if b.past is None else b.past, b.rope, b.mask, b.kv_cache, b.packed_qkv or "no",
            b.lora or "no", b.fused_op or "", "yes" if b.would_split else "no", reason,
        ]  # fmt: skip
        rows.append(row)
    return rows


def _attention_section(structure: StructureRecord, split_word: str = "would split") -> str:
    blocks = structure.blocks
    if not blocks:
        return '<h2 id="attention">Attention blocks</h2><p>No attention found (no Softmax feeding a MatMul with V).</p>'
    headers = [
        "block", "layer", "kind", "heads", "KV heads", "head dim", "seq", "past", "RoPE", "mask", "KV cache",
        "packed QKV", "LoRA", "fused op", split_word, "reason / features",
    ]  # fmt: skip
    out = [f'<h2 id="attention">Attention blocks ({len(blocks)})</h2>']
    table = _table(
        headers,
        attention_rows(blocks),
        table_id="attention-table",
        numeric=(3, 4, 5, 6, 7),
        classes=["" if b.would_split else "no" for b in blocks],
        cell_class={14: lambda v: "yes" if v == "yes" else "no"},
    )
    # a long table folds away (the kinds below summarise it); blocks that would not split keep it open
    unfold = len(blocks) <= 12 or any(not b.would_split for b in blocks)
    out.append(f"<details{' open' if unfold else ''}><summary>one row per block</summary>{table}</details>")
    if structure.other_softmax:
        out.append(
            f"<p class=\"muted\">Softmax not in an attention core (left as is): {_e(', '.join(structure.other_softmax))}</p>"
        )
    return "".join(out)


def _legend() -> str:
    return '<div class="legend">' + "".join(
        f'<span><i style="background:{ROLE_COLOURS[r]}"></i>{_e(name)}</span>' for r, name in ROLE_NAMES.items()
    ) + "</div>"


def _kinds_section(structure: StructureRecord, done: bool) -> str:
    if not structure.kinds:
        return ""
    out = [f'<h2 id="kinds">Kinds of attention block ({len(structure.kinds)}) and their drawings</h2>', _legend()]
    for kind in structure.kinds:
        layers = ", ".join(kind.layers[:6]) + (f" … (+{len(kind.layers) - 6})" if len(kind.layers) > 6 else "")
        out.append(f'<div class="kind" id="kind-{_e(kind.label)}"><h3>Kind {_e(kind.label)}: {len(kind.blocks)} block(s)</h3>')
        out.append(f"<div>{_e(kind.summary)}</div><div class=\"muted\">layers: {_e(layers)}</div>")
        drawings = []
        if kind.mha is not None:
            drawings.append(
                f'<div class="drawing"><h4>As the graph has it (multi-head)</h4>{sketch_svg(kind.mha, f"k{kind.label}-mha")}</div>'
            )
        if kind.sha is not None:
            verb = "was" if done else "will be"
            drawings.append(
                f'<div class="drawing"><h4>As it {verb} split: one head</h4>'
                f'<div class="muted">{_e(kind.sha.note)}</div>{sketch_svg(kind.sha, f"k{kind.label}-sha")}</div>'
            )
        elif kind.mha is not None:
            drawings.append('<div class="drawing muted">Not split: no per-head drawing.</div>')
        out.append(f'<div class="drawings">{"".join(drawings)}</div></div>')
    return "".join(out)


def _ops_section(ops: Sequence[OpSupport], probe: ProbeRecord | None) -> str:
    out = ['<h2 id="ops">Operators and HTP support</h2>']
    if probe is not None:
        status = {"ran": "ran", "unavailable": "not available", "failed": "failed", "skipped": "skipped"}[probe.status]
        lines = [f"HTP support probe ({_e(probe.soc)}): {status}"]
        if probe.status == "ran":
            compiled = {True: "the probe's QNN graph compiled", False: "the probe's QNN graph failed to compile",
                        None: "not compiled (some node was rejected, so the session stopped at partitioning)"}[probe.compiled]  # fmt: skip
            lines.append(f"{len(probe.nodes)} node(s) asked, {sum(1 for _, t, _ in probe.nodes.values() if not t)} rejected; {compiled}; {probe.seconds:.1f} s")
        if probe.encodings:
            lines.append(f"quantization of the probe: {probe.encodings}")
        if probe.message:
            lines.append(probe.message)
        out.append("<p>" + "<br>".join(_e(line) for line in lines) + "</p>")
        if probe.components:
            out.append(f"<details><summary>what was probed ({len(probe.components)} part(s))</summary>{_list(probe.components)}</details>")
    rows = [[o.op, o.domain or "ai.onnx", o.count, o.htp, o.reason, o.note] for o in ops]
    out.append(
        _table(
            ["op type", "domain", "count", "runs on HTP", "reason", "note"],
            rows,
            table_id="ops-table",
            numeric=(2,),
            cell_class={3: lambda v: str(v)},
        )
    )
    return "".join(out)


def _inputs_section(inputs: Sequence[InputInfo], outputs: Sequence[tuple[str, str]], suggestion: str, note: str) -> str:
    out = ['<h2 id="inputs">Inputs and outputs</h2>']
    dynamic = [i for i in inputs if i.dynamic]
    if dynamic:
        out.append(f"<p>{len(dynamic)} dynamic input(s). {_e(note)}</p>")
    if suggestion:
        out.append(f'<p>Static shapes for <code>mha2sha convert</code> in one run:</p><pre class="cmd">{_e(suggestion)}</pre>')
    out.append(
        _table(
            ["input", "dtype", "declared", "static shape used", "dynamic"],
            [[i.name, i.dtype, i.declared, i.used, "yes" if i.dynamic else "no"] for i in inputs],
            table_id="inputs-table",
        )
    )
    if outputs:
        out.append(_table(["output", "declared shape"], [list(o) for o in outputs], table_id="outputs-table"))
    return "".join(out)


def _rank_section(
    before: Sequence[tuple[str, str, str]],
    after: Sequence[tuple[str, str, str]] | None,
    done: bool,
    in_blocks: Sequence[str] = (),
) -> str:
    out = [f'<h2 id="rank">Tensors of rank &gt; 4 (HTP takes at most 4-D): {len(before)}</h2>']
    if before and not done:
        rewritten = set(in_blocks)
        rows = [[*t, "yes" if t[0] in rewritten else "no"] for t in before]
        out.append(
            _table(["tensor", "shape", "producer", "in a block the split recomputes per head"], rows, table_id="rank-table")
        )
    elif before:
        out.append(_table(["tensor", "shape", "producer"], [list(t) for t in before], table_id="rank-table"))
    else:
        out.append("<p>None.</p>")
    if after is not None:
        what = "after the conversion" if done else "after the split (dry run, without --target htp)"
        out.append(f"<h3>{_e(what)}: {len(after)}</h3>")
        if after:
            out.append(_table(["tensor", "shape", "producer"], [list(t) for t in after], table_id="rank-after-table"))
    return "".join(out)


def _few(items: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" … (+{len(items) - limit})" if len(items) > limit else "")


def _encodings_section(summary: EncodingsSummary | None, coverage: CoverageReport | None, done: bool) -> str:
    if summary is None and coverage is None:
        return '<h2 id="encodings">Encodings</h2><p class="muted">No encodings given (--encodings).</p>'
    out = ['<h2 id="encodings">Encodings coverage</h2>']
    if summary is not None:
        if summary.ok:
            verdict = '<span class="ok">every float tensor and weight has an encoding</span>'
        else:
            verdict = _e(
                f"{len(summary.unencoded_activations)} float tensor(s) and {len(summary.unencoded_weights)} weight(s) "
                f"without an encoding (they stay unquantized), {len(summary.unknown)} encoding(s) naming no tensor"
            )
            verdict = f'<span class="warn">{verdict}</span>'
        out.append(f"<p><code>{_e(summary.path)}</code> (version {_e(summary.version)}): {verdict}</p>")
        rows = [
            ["activations encoded (float outputs; data movement inherits)", f"{summary.encoded_activations} / {summary.float_activations}", _few(summary.unencoded_activations)],
            ["weights encoded (MatMul / Gemm / Conv / Gather)", f"{summary.encoded_weights} / {summary.weights}", _few(summary.unencoded_weights)],
            ["tensors the split cuts, encoded", f"{summary.attention_tensors - len(summary.attention_unencoded)} / {summary.attention_tensors}", _few(summary.attention_unencoded)],
            ["encodings naming no tensor of the model", str(len(summary.unknown)), _few(summary.unknown)],
        ]  # fmt: skip
        out.append(_table(["what", "count", "missing / unknown (first few)"], rows, table_id="encodings-table"))
    if coverage is not None:
        what = "Propagation to the per-head model" + ("" if done else " (dry run)")
        verdict = "no gap" if coverage.ok else "GAPS"
        out.append(f"<h3>{_e(what)}: {_e(verdict)}</h3>")
        rows = []
        for label, items in (
            ("MHA tensors with encodings (split)", coverage.mha_encoded),
            ("per-head tensors encoded", coverage.sha_encoded),
            ("per-head tensors missing an encoding", coverage.missing),
            ("encodings dropped (tensor gone)", coverage.dropped),
            ("encodings naming no original tensor", coverage.unknown),
            ("split tensors without encoding", coverage.unencoded_splits),
            ("encodings kept unchanged", coverage.kept),
            ("removed, same encoding as its data-movement input or copy", coverage.folded),
            ("heads joined (Concat), encoding of the pieces' source", coverage.joined),
        ):
            names = list(items) if not isinstance(items, dict) else [f"{k} ({v})" for k, v in items.items()]
            rows.append([label, str(len(names)), _few(names, 5)])
        out.append(_table(["category", "count", "examples"], rows, numeric=(1,), table_id="coverage-table"))
    return "".join(out)


def _lowering_section(lowered: dict[str, int], refused: Sequence[tuple[str, str, str]]) -> str:
    if not lowered and not refused:
        return ""
    out = ['<h2 id="lowering">Fused ops</h2>']
    if lowered:
        out.append("<p>Lowered to ONNX primitives: " + _e(", ".join(f"{n} {op}" for op, n in sorted(lowered.items()))) + "</p>")
    if refused:
        out.append(_table(["node", "op", "kept as it is because"], [list(r) for r in refused], table_id="lowering-table"))
    return "".join(out)


def _phases_section(phases: Sequence[PhaseRecord]) -> str:
    if not phases:
        return ""
    rows = [[p.name, f"{p.seconds:.2f}", f"{p.peak_rss_mb:.0f}"] for p in phases]
    rows.append(["total", f"{sum(p.seconds for p in phases):.2f}", f"{max(p.peak_rss_mb for p in phases):.0f}"])
    return '<h2 id="timing">Time and memory</h2>' + _table(
        ["phase", "seconds", "peak RSS (MB)"], rows, numeric=(1, 2), table_id="timing-table"
    )


def _cards(structure: StructureRecord, facts: ModelFacts, problems: Sequence[str], split_word: str) -> str:
    blocks = structure.blocks
    splits = sum(1 for b in blocks if b.would_split)
    return '<div class="cards">' + "".join(
        [
            _card("attention blocks", len(blocks)),
            _card(split_word, f"{splits} / {len(blocks)}", "ok" if splits == len(blocks) and blocks else "warn"),
            _card("kinds of block", len(structure.kinds)),
            _card("nodes", facts.nodes),
            _card("weights", f"{facts.weight_bytes / 2**30:.2f} GiB" if facts.weight_bytes >= 2**30 else f"{facts.weight_bytes / 2**20:.1f} MiB"),
            _card("problems", len(problems), "bad" if problems else "ok"),
        ]
    ) + "</div>"


# ----------------------------------------------------------------------------- pages


def analysis_html(record: AnalysisRecord) -> str:
    """The ``mha2sha analyze`` report."""
    verdict = (
        '<p class="ok">convert would split every attention block.</p>'
        if record.convertible
        else '<p class="bad">convert would not take this model as it is: see the problems.</p>'
    )
    body = [
        _cards(record.structure, record.facts, record.problems, "would split"),
        f"<p>Model <code>{_e(record.model)}</code>, opset {record.opset}, producer {_e(record.producer)}.</p>",
        verdict,
        '<h2 id="summary">What would stop the conversion</h2>' + (_list(record.problems, "problems") or "<p>Nothing.</p>"),
        _list(record.notes, "notes"),
        _attention_section(record.structure),
        _kinds_section(record.structure, done=False),
        _ops_section(record.ops, record.probe),
        _inputs_section(record.inputs, record.outputs, record.shape_suggestion, record.shapes_note),
        _rank_section(record.facts.high_rank, record.high_rank_after_split, False, record.rank_in_split_blocks),
        _encodings_section(record.encodings, record.coverage, done=False),
        _lowering_section(record.lowered, record.not_lowered),
        _phases_section(record.phases),
    ]
    nav = [("summary", "summary"), ("attention", "attention"), ("kinds", "drawings"), ("ops", "ops / HTP"),
           ("inputs", "inputs"), ("rank", "rank > 4"), ("encodings", "encodings"), ("timing", "timing")]  # fmt: skip
    return _page(f"mha2sha analyze: {record.name}", record.model, nav, "".join(body))


def _fmt(x: float) -> str:
    return "-" if math.isinf(x) else f"{x:.3e}"


def _verification_section(verify: VerifyRecord | None) -> str:
    if verify is None:
        return '<h2 id="verification">Verification</h2><p class="warn">Not verified (--no-verify).</p>'
    out = ['<h2 id="verification">Verification</h2>']
    v, plan = verify.float, verify.plan
    out.append(f"<p>mode: {_e(plan.mode)} ({_e(plan.reason())})</p>")
    if v is not None:
        verdict = '<b class="ok">PASS</b>' if v.ok else '<b class="bad">FAIL</b>'
        out.append(f"<p>float: {verdict}, rtol {v.rtol:.1e}, max rel err {_e(_fmt(v.max_rel_err))}, {len(v.rows)} outputs compared</p>")
        rows = [
            [r.name, "x".join(map(str, r.shape)) or "scalar", _fmt(r.max_abs_err), _fmt(r.max_rel_err), ("ok" if r.ok else "FAIL") + (f" ({r.note})" if r.note else "")]
            for r in v.rows
        ]  # fmt: skip
        out.append(_table(["output", "shape", "max abs err", "max rel err", "status"], rows, table_id="verification-table", numeric=(2, 3)))
    out.append(_list([str(n) for n in plan.notes], "notes"))
    if verify.qdq_lsb is not None:
        rows = [[name, f"{lsb:g}"] for name, lsb in verify.qdq_lsb.items()]
        out.append("<h3>Quantized (QDQ, onnxruntime CPU): MHA vs SHA, LSB per output</h3>")
        out.append(_table(["output", "max LSB"], rows, numeric=(1,), table_id="qdq-table"))
    if verify.qdq_local is not None:
        local = verify.qdq_local
        worst_tensor = local.worst
        out.append(
            f"<p>Quantized tensor by tensor: {len(local.tensors)} tensors, max {worst_tensor.lsb if worst_tensor else 0:g} LSB given the same quantized inputs</p>"
        )
    if verify.htp is not None:
        h = verify.htp
        worst = max(h.max_lsb.values(), default=0.0)
        lines = [
            f"HTP emulator {h.soc}: SHA {'runs with CPU fallback disabled' if h.sha_on_htp_only else 'needs CPU fallback'} "
            f"({len(h.sha_unsupported)} unsupported node(s)); MHA {'runs' if h.mha_on_htp_only else 'needs CPU fallback'}",
            f"MHA vs SHA on HTP: {'bit-exact' if worst == 0 else f'max {worst:g} LSB'}",
        ]
        out.append("<h3>HTP</h3><p>" + "<br>".join(_e(x) for x in lines) + "</p>")
        if h.sha_unsupported:
            out.append(_table(["node", "op"], [list(x) for x in h.sha_unsupported], table_id="htp-unsupported-table"))
    return "".join(out)


def _layout_section(layout: LayoutRecord | None) -> str:
    if layout is None:
        return ""
    rows = [["projections now Conv 1x1", len(layout.conv)], ["layout ops removed", layout.nodes_removed],
            ["tensors lowered to rank <= 4", len(layout.rank_lowered)], ["nodes kept as they were", len(layout.skipped)],
            ["per-head o_proj", len(layout.o_proj)]]  # fmt: skip
    out = ['<h2 id="layout">HTP layout</h2>', _table(["what", "count"], rows, numeric=(1,), table_id="layout-table")]
    if layout.skipped:
        out.append(_table(["node", "why kept"], [[s.node, s.reason] for s in layout.skipped], table_id="layout-skipped-table"))
    return "".join(out)


def _converted_ops_section(before: ModelFacts, after: ModelFacts | None, htp: Any) -> str:
    keys = sorted(set(before.ops) | set(after.ops if after else {}))
    unsupported: dict[str, int] = {}
    if htp is not None:
        for _, op in htp.sha_unsupported:
            unsupported[op] = unsupported.get(op, 0) + 1
    rows = []
    for domain, op in keys:
        n_after = after.ops.get((domain, op), 0) if after else ""
        if htp is None:
            support, reason = "unknown", "not probed: run `mha2sha analyze`, or convert with --verify-htp"
        elif htp.sha_on_htp_only or not unsupported.get(op):
            support, reason = "yes", f"the converted QDQ model ran on the HTP emulator {htp.soc} ({'no' if htp.sha_on_htp_only else 'with'} CPU fallback)"
            if not n_after:
                support, reason = "unknown", "not in the converted model"
        else:
            support, reason = "no", f"{unsupported[op]} node(s) the QNN EP did not take"
        rows.append([op, domain or "ai.onnx", before.ops.get((domain, op), 0), n_after, support, reason])
    return '<h2 id="ops">Operators</h2>' + _table(
        ["op type", "domain", "count before", "count after", "runs on HTP", "reason"],
        rows, numeric=(2, 3), table_id="ops-table", cell_class={4: lambda v: str(v)},
    )  # fmt: skip


def conversion_html(
    *,
    name: str,
    model_path: str,
    structure: StructureRecord | None,
    inputs: Sequence[InputInfo],
    outputs: Sequence[tuple[str, str]],
    facts_before: ModelFacts | None,
    facts_after: ModelFacts | None,
    lowering: LowerRecord | None,
    layout: LayoutRecord | None,
    coverage: CoverageReport | None,
    verify: VerifyRecord | None,
    phases: Sequence[PhaseRecord],
    files: Sequence[str],
) -> str:
    """The ``mha2sha convert`` report: what was split, the drawings, verification, timing."""
    structure = structure or StructureRecord()
    before = facts_before or ModelFacts()
    problems = [f"{b.name}: {b.reason}" for b in structure.blocks if not b.would_split and (b.heads or 2) > 1]
    lowered: dict[str, int] = {}
    for _, op, _ in lowering.lowered if lowering else []:
        lowered[op] = lowered.get(op, 0) + 1
    body = [
        _cards(structure, before, problems, "split"),
        f"<p>Model <code>{_e(model_path)}</code> converted to <code>{_e(name)}.onnx</code>.</p>",
        '<h2 id="summary">Left as multi-head</h2>' + (_list(problems, "problems") or "<p>Nothing: every attention block was split.</p>"),
        _verification_section(verify),
        _attention_section(structure, "split"),
        _kinds_section(structure, done=True),
        _converted_ops_section(before, facts_after, verify.htp if verify else None),
        _inputs_section(inputs, outputs, "", ""),
        _rank_section(before.high_rank, facts_after.high_rank if facts_after else None, done=True),
        _encodings_section(None, coverage, done=True) if coverage is not None else "",
        _layout_section(layout),
        _lowering_section(lowered, lowering.refused if lowering else []),
        _phases_section(phases),
        '<h2 id="files">Files written</h2>' + _list(list(files)),
    ]
    nav = [("summary", "summary"), ("verification", "verification"), ("attention", "attention"), ("kinds", "drawings"),
           ("ops", "ops"), ("inputs", "inputs"), ("rank", "rank > 4"), ("timing", "timing"), ("files", "files")]  # fmt: skip
    return _page(f"mha2sha convert: {name}", model_path, nav, "".join(body))
