"""A mode's phase diagram as SVG, drawn here from the compiled spec (no JavaScript library, no CDN).

The edges are exactly those of the Mermaid diagram `macp-runtime docs` writes (`codegen.docs.edges`,
which its Mermaid and Graphviz output are made of), so the console and the generated docs cannot disagree. Phases
stand in one row in spec order: the step to the next phase is a straight arrow, longer steps forward
arc above the row, steps back arc below it, a phase to itself is a loop. Every node and edge carries
`data-` attributes so the page can mark the current phase and the path a session took; labels too
long for an arc become numbers that refer to the transition list printed under the diagram, which
is also the diagram's text alternative.
"""
from __future__ import annotations

import html

from ...codegen.docs import edges, terminal_phases

NODE_H = 40
GAP = 96
CHAR_W = 7.6
MAX_INLINE_LABEL = 22
TOP = 30


def phase_graph(mode) -> dict:
    """{phases, initial, terminal, edges: [{from, to, label}]} of a compiled mode."""
    # the Mermaid diagram's edges and labels, before Mermaid's escaping (`#59;` for `;`)
    return {"phases": list(mode.phases), "initial": mode.initial_phase, "terminal": terminal_phases(mode),
            "edges": [{"from": src, "to": dst, "label": label} for src, dst, label in edges(mode)]}


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


def svg(graph: dict, title: str = "") -> str:
    phases = graph["phases"]
    widths = [max(96, int(len(p) * CHAR_W * 1.1) + 28) for p in phases]
    xs, x = [], 40
    for w in widths:
        xs.append(x)
        x += w + GAP
    total_w = x - GAP + 30
    index = {p: i for i, p in enumerate(phases)}
    edges = [e for e in graph["edges"] if e["from"] in index and e["to"] in index]
    spans_up = [index[e["to"]] - index[e["from"]] for e in edges if index[e["to"]] > index[e["from"]] + 1]
    spans_down = [index[e["from"]] - index[e["to"]] for e in edges if index[e["to"]] < index[e["from"]]]
    has_loop = any(e["from"] == e["to"] for e in edges)
    up = max([40 * s for s in spans_up] + [58 if has_loop else 0, 24])
    down = max([40 * s for s in spans_down] + [20])
    mid = TOP + up + NODE_H / 2
    height = int(mid + NODE_H / 2 + down + 34)

    def cx(i):
        return xs[i] + widths[i] / 2

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="phase-diagram" viewBox="0 0 {int(total_w)} {height}" '
           f'width="{int(total_w)}" height="{height}" role="img" aria-labelledby="dg-title">',
           f'<title id="dg-title">{_esc(title or "Phase diagram")}: phases {_esc(", ".join(phases))}; '
           f'the transition list below describes every arrow</title>',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="9" markerHeight="9" markerUnits="userSpaceOnUse" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="arrowhead"/></marker>'
           '<marker id="arrow-taken" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="9" markerHeight="9" markerUnits="userSpaceOnUse" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="arrowhead-taken"/></marker></defs>']
    labels = []
    for n, e in enumerate(edges, 1):
        i, j = index[e["from"]], index[e["to"]]
        label = e["label"]
        text = label if len(label) <= MAX_INLINE_LABEL else f"({n})"
        attrs = f'class="edge" data-from="{_esc(e["from"])}" data-to="{_esc(e["to"])}" data-n="{n}"'
        if i == j:
            x0, y0 = cx(i) - 14, mid - NODE_H / 2
            d = f"M{x0:.0f},{y0:.0f} C{x0 - 18:.0f},{y0 - 52:.0f} {x0 + 46:.0f},{y0 - 52:.0f} {x0 + 28:.0f},{y0:.0f}"
            lx, ly = cx(i), y0 - 44
        elif j == i + 1:
            x0, x1 = xs[i] + widths[i], xs[j]
            d = f"M{x0:.0f},{mid:.0f} L{x1:.0f},{mid:.0f}"
            lx, ly = (x0 + x1) / 2, mid - 8
            if len(text) * CHAR_W > GAP:
                text = f"({n})"
        elif j > i:
            x0, x1 = cx(i) + 10, cx(j) - 10
            h = 40 * (j - i)
            y0 = mid - NODE_H / 2
            d = f"M{x0:.0f},{y0:.0f} C{x0:.0f},{y0 - h:.0f} {x1:.0f},{y0 - h:.0f} {x1:.0f},{y0:.0f}"
            lx, ly = (x0 + x1) / 2, y0 - h * 0.75 - 4
        else:
            x0, x1 = cx(i) - 10, cx(j) + 10
            h = 40 * (i - j)
            y0 = mid + NODE_H / 2
            d = f"M{x0:.0f},{y0:.0f} C{x0:.0f},{y0 + h:.0f} {x1:.0f},{y0 + h:.0f} {x1:.0f},{y0:.0f}"
            lx, ly = (x0 + x1) / 2, y0 + h * 0.75 + 14
        out.append(f'<path {attrs} d="{d}" fill="none" marker-end="url(#arrow)"><title>{_esc(e["from"])} → '
                   f'{_esc(e["to"])}: {_esc(label)}</title></path>')
        labels.append(f'<text class="edge-label" data-n="{n}" x="{lx:.0f}" y="{ly:.0f}" '
                      f'text-anchor="middle">{_esc(text)}</text>')
    out.extend(labels)
    first = index.get(graph["initial"])
    if first is not None:
        out.append(f'<circle class="start" cx="{xs[first] - 22}" cy="{mid:.0f}" r="6"/>'
                   f'<path class="edge start-edge" d="M{xs[first] - 16},{mid:.0f} L{xs[first]},{mid:.0f}" '
                   f'marker-end="url(#arrow)"/>')
    for i, p in enumerate(phases):
        cls = "phase terminal" if p in graph["terminal"] else "phase"
        y = mid - NODE_H / 2
        inner = ""
        if p in graph["terminal"]:
            inner = (f'<rect class="phase-inner" x="{xs[i] + 4}" y="{y + 4:.0f}" width="{widths[i] - 8}" '
                     f'height="{NODE_H - 8}" rx="8"/>')
        out.append(f'<g class="{cls}" data-phase="{_esc(p)}"><rect x="{xs[i]}" y="{y:.0f}" width="{widths[i]}" '
                   f'height="{NODE_H}" rx="10"/>{inner}<text x="{cx(i):.0f}" y="{mid + 5:.0f}" '
                   f'text-anchor="middle">{_esc(p)}</text></g>')
    out.append("</svg>")
    return "".join(out)


def legend(graph: dict) -> list[dict]:
    """The transition list: number, from, to, label (the text alternative of the diagram)."""
    index = {p: i for i, p in enumerate(graph["phases"])}
    edges = [e for e in graph["edges"] if e["from"] in index and e["to"] in index]
    return [{"n": n, **e} for n, e in enumerate(edges, 1)]
