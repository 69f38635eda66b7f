"""Draw a :class:`~mha2sha.analyze.record.Sketch` (a small DAG) as inline SVG, top to bottom.

Layered layout: a node's layer is its longest path from a source; nodes of a layer are ordered by
the mean position of their neighbours (a few sweeps down and up, which untangles most crossings of
an attention block), then placed left to right and centred. Edges are curves with arrow heads.
No scripts, no external references: the SVG is part of a self-contained HTML file.
"""

from __future__ import annotations

import collections
import html

from mha2sha.analyze.record import Sketch

__all__ = ["ROLE_COLOURS", "ROLE_NAMES", "sketch_svg"]

#: Fill colour per node role, and what the role means (the legend).
ROLE_COLOURS = {
    "input": "#e8eef9",
    "shared": "#eef0f2",
    "output": "#f3e8fb",
    "proj": "#cfe2ff",
    "rope": "#ffe0b2",
    "kv": "#c8f0d0",
    "mask": "#e6d5f7",
    "core": "#ffcdd2",
    "norm": "#fff3c4",
    "layout": "#f1f1f1",
    "other": "#ffffff",
    "join": "#d7ccc8",
}
ROLE_NAMES = {
    "proj": "projection (weight)",
    "rope": "RoPE",
    "kv": "KV cache",
    "mask": "mask / bias",
    "core": "Q·Kᵀ, scale, Softmax, P·V",
    "norm": "normalisation",
    "layout": "layout / data movement",
    "input": "graph input",
    "shared": "tensor from outside the block",
    "output": "graph output / rest of model",
    "join": "heads joined",
}

_CHAR = 6.4  # px per character at 11px monospace-ish sans
_H = 36
_GAP_X = 14
_GAP_Y = 30
_MAX_W = 250
_PAD = 12


def _clip(text: str, width: int) -> str:
    limit = max(4, int((width - 12) / _CHAR))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sketch_svg(sketch: Sketch, element_id: str = "") -> str:
    """The sketch as an ``<svg>`` element (empty string for an empty sketch)."""
    if not sketch.nodes:
        return ""
    ids = [n.id for n in sketch.nodes]
    index = {nid: i for i, nid in enumerate(ids)}
    preds: dict[str, list[str]] = collections.defaultdict(list)
    succs: dict[str, list[str]] = collections.defaultdict(list)
    for a, b in sketch.edges:
        if a in index and b in index and a != b:
            preds[b].append(a)
            succs[a].append(b)
    # longest-path layering (Kahn's order; a cycle, never expected, falls back to input order)
    indegree = {nid: len(preds[nid]) for nid in ids}
    layer = {nid: 0 for nid in ids}
    queue = collections.deque(nid for nid in ids if indegree[nid] == 0)
    seen = 0
    while queue:
        nid = queue.popleft()
        seen += 1
        for nxt in succs[nid]:
            layer[nxt] = max(layer[nxt], layer[nid] + 1)
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                queue.append(nxt)
    # sources sit right above their first reader
    for nid in ids:
        if not preds[nid] and succs[nid]:
            layer[nid] = max(0, min(layer[s] for s in succs[nid]) - 1)
    layers: dict[int, list[str]] = collections.defaultdict(list)
    for nid in ids:
        layers[layer[nid]].append(nid)
    depth = max(layers) + 1 if layers else 0
    position = {nid: float(i) for nid in ids for i in [layers[layer[nid]].index(nid)]}
    for _ in range(4):
        for rng, neighbours in ((range(1, depth), preds), (range(depth - 2, -1, -1), succs)):
            for level in rng:
                row = layers[level]

                def key(nid: str, neighbours=neighbours) -> float:
                    near = neighbours[nid]
                    return sum(position[n] for n in near) / len(near) if near else position[nid]

                row.sort(key=key)
                for i, nid in enumerate(row):
                    position[nid] = float(i)
    nodes = {n.id: n for n in sketch.nodes}
    width = {
        nid: min(_MAX_W, max(70, int(_CHAR * max(len(nodes[nid].label), len(nodes[nid].detail)) + 16)))
        for nid in ids
    }
    rows_w = {lv: sum(width[n] for n in row) + _GAP_X * (len(row) - 1) for lv, row in layers.items()}
    total_w = max(rows_w.values()) + 2 * _PAD
    xy: dict[str, tuple[float, float]] = {}
    for lv, row in layers.items():
        x = _PAD + (total_w - 2 * _PAD - rows_w[lv]) / 2
        for nid in row:
            xy[nid] = (x, _PAD + lv * (_H + _GAP_Y))
            x += width[nid] + _GAP_X
    total_h = _PAD * 2 + depth * (_H + _GAP_Y) - _GAP_Y
    marker = f"arrow{element_id}" if element_id else "arrow"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="sketch" width="{total_w:.0f}" height="{total_h:.0f}" '
        f'viewBox="0 0 {total_w:.0f} {total_h:.0f}" role="img" aria-label="{html.escape(sketch.title)}"'
        + (f' id="{html.escape(element_id)}"' if element_id else "")
        + ">",
        f'<defs><marker id="{marker}" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L8,4 L0,8 z" fill="#777"/></marker></defs>',
    ]
    for a, b in sketch.edges:
        if a not in xy or b not in xy or a == b:
            continue
        (ax, ay), (bx, by) = xy[a], xy[b]
        x1, y1 = ax + width[a] / 2, ay + _H
        x2, y2 = bx + width[b] / 2, by - 1
        mid = (y1 + y2) / 2
        out.append(
            f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{mid:.1f} {x2:.1f},{mid:.1f} {x2:.1f},{y2:.1f}" '
            f'fill="none" stroke="#888" stroke-width="1.1" marker-end="url(#{marker})"/>'
        )
    for nid in ids:
        node = nodes[nid]
        x, y = xy[nid]
        w = width[nid]
        fill = ROLE_COLOURS.get(node.role, "#fff")
        shape_rx = 14 if node.role in ("input", "shared", "output") else 4
        dash = ' stroke-dasharray="4 2"' if node.role in ("shared",) else ""
        tip = html.escape(" ".join(t for t in (node.title or node.label, node.detail) if t))
        out.append(
            f'<g class="node role-{html.escape(node.role)}"><title>{tip}</title>'
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{w}" height="{_H}" rx="{shape_rx}" fill="{fill}" '
            f'stroke="#666" stroke-width="0.9"{dash}/>'
            f'<text x="{x + w / 2:.1f}" y="{y + 14:.1f}" text-anchor="middle" class="l">{html.escape(_clip(node.label, w))}</text>'
            f'<text x="{x + w / 2:.1f}" y="{y + 28:.1f}" text-anchor="middle" class="d">{html.escape(_clip(node.detail, w))}</text>'
            "</g>"
        )
    out.append("</svg>")
    return "".join(out)
