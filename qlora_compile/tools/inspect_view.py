"""Views of an `inspect_model` result: rich tables for a terminal, and a self-contained HTML page.

The page holds the JSON result in a `<script type="application/json">` element and draws
everything with its own inline script (no network, no CDN): the totals, the rewrite table
(`tr.rewrite`), the graph breaks, and one SVG per (sub-)graph with one `g.node` per FX node,
coloured by the pass that made it (`pass-fuse_lora`, `pass-fuse_shared_input`,
`pass-rewrite_storage`, `pass-none`).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict

from rich.console import Console
from rich.table import Table

PASS_COLOURS = {
    "fuse_lora": "#e4572e",
    "fuse_shared_input": "#7b2cbf",
    "rewrite_storage": "#2a9d8f",
    "none": "#d9d9d9",
}


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def traced_note(result: dict) -> str:
    t = result["traced"]
    of = f" of {t['of_layers']}" if t["of_layers"] and t["layers"] != t["of_layers"] else ""
    return (
        f"Rewrite table and bytes: the whole model, computed from shapes (no weights read). "
        f"Graphs: Dynamo on the meta device, {t['mode']} mode, {t['call']} with a "
        f"{t['batch_size']}x{t['seq_len']} input, {t['layers']}{of} layers (the others trace the same); "
        f"kernel choices are the CPU's."
    )


def _group_rewrites(rows: list[dict]) -> list[tuple[str, int, dict]]:
    """Rows equal but for the layer number, merged: ("model.layers.{0-79}.mlp.up_proj", 80, row)."""
    groups: OrderedDict = OrderedDict()
    for row in rows:
        match = re.search(r"\.(\d+)\.", row["name"])
        pattern = (
            row["name"]
            if match is None
            else row["name"][: match.start(1)] + "*" + row["name"][match.end(1) :]
        )
        key = (pattern, row["kind"], tuple(row["shape"]), row["status"], row["reason"], row["bytes_after"])
        numbers = groups.setdefault(key, (row, []))[1]
        if match is not None:
            numbers.append(int(match.group(1)))
    out = []
    for (pattern, *_), (row, numbers) in groups.items():
        name = row["name"]
        if len(numbers) > 1:
            lo, hi = min(numbers), max(numbers)
            span = (
                f"{{{lo}-{hi}}}" if hi - lo + 1 == len(numbers) else "{" + ",".join(map(str, numbers)) + "}"
            )
            name = pattern.replace("*", span, 1)
        out.append((name, max(len(numbers), 1), row))
    return out


def print_rich(result: dict, console: Console | None = None) -> None:
    console = console or Console()
    m, c = result["model"], result["config"]
    console.print(
        f"[bold]{m['path']}[/bold]: {m['architecture']} ({m['model_type']}), {m['num_hidden_layers']} layers, "
        f"{m['parameters']:,} parameters in {m['dtype']}; {c['quant_type']} blocksize {c['blocksize']}"
        f"{' + double quantization' if c['double_quant'] else ''}, LoRA r={c['r']}"
    )
    table = Table(title="Storage rewrite", show_lines=False)
    table.add_column("module", no_wrap=True)
    for col in ("kind", "shape", "status"):
        table.add_column(col)
    for col in ("before", "after", "bits/param"):
        table.add_column(col, justify="right", no_wrap=True)
    for name, count, row in _group_rewrites(result["rewrites"]):
        status = "quantized" if row["status"] == "quantized" else f"[yellow]skipped: {row['reason']}[/yellow]"
        bits = f"{row['bits_per_param']:.3f}" if row["bits_per_param"] is not None else "-"
        table.add_row(
            name + (f" (x{count})" if count > 1 else ""), row["kind"], "x".join(map(str, row["shape"])), status,
            human_bytes(row["bytes_before"] * count), human_bytes(row["bytes_after"] * count), bits,
        )  # fmt: skip
    console.print(table)
    if result["traced"].get("error"):
        console.print(f"[red]Tracing failed[/red]: {result['traced']['error']}")
    graphs = Table(title="Captured graphs")
    for col in ("graph", "nodes", "sub-graphs", "our ops", "passes"):
        graphs.add_column(col)
    for g in result["graphs"]:
        ops = ", ".join(f"{k} x{v}" for k, v in g["our_ops"].items()) or "-"
        passes = ", ".join(f"{k}: {v}" for k, v in g["passes"].items() if v) or "-"
        graphs.add_row(str(g["index"]), str(g["node_count"]), str(len(g["modules"]) - 1), ops, passes)
    console.print(graphs)
    if result["graph_breaks"]:
        breaks = Table(title="Graph breaks")
        breaks.add_column("reason")
        breaks.add_column("where")
        for b in result["graph_breaks"]:
            breaks.add_row(b["reason"], (b["where"] or "-") + (f"\n{b['code']}" if b.get("code") else ""))
        console.print(breaks)
    else:
        console.print("Graph breaks: none")
    t = result["totals"]
    bits = f"{t['bits_per_param']:.3f}" if t["bits_per_param"] is not None else "-"
    console.print(
        f"[bold]Totals[/bold]: {t['modules_quantized']} modules quantized, {t['modules_skipped']} skipped; "
        f"{t['params_quantized']:,} parameters {human_bytes(t['bytes_before'])} -> {human_bytes(t['bytes_after'])} "
        f"({bits} bits/param); {t['graphs']} graph(s), {t['nodes']} nodes, {t['graph_breaks']} graph break(s); "
        + (", ".join(f"{k}: {v}" for k, v in t["passes"].items()) or "no pass applied")
    )
    console.print(f"[dim]{traced_note(result)}[/dim]")


_STYLE = (
    """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
tr.skipped { background: #fff3cd; }
.legend span { display: inline-block; padding: 2px 8px; margin-right: 6px; border-radius: 3px; color: #fff; }
.graph-box { overflow: auto; border: 1px solid #ddd; max-height: 80vh; margin-bottom: 1.5em; }
svg.graph text { font: 11px monospace; pointer-events: none; }
svg.graph path.edge { fill: none; stroke: #999; stroke-width: 1; }
g.node rect { stroke: #555; stroke-width: .5; }
"""
    + "\n".join(
        f"g.node.pass-{name} rect {{ fill: {colour}; }} .legend .pass-{name} {{ background: {colour}; }}"
        for name, colour in PASS_COLOURS.items()
    )
    + """
g.node.io rect { fill: #eef3fb; }
.legend .pass-none { color: #222; }
g.node.pass-fuse_lora text, g.node.pass-fuse_shared_input text, g.node.pass-rewrite_storage text { fill: #fff; }
"""
)

_SCRIPT = r"""
(function () {
  const data = JSON.parse(document.getElementById('inspect-data').textContent);
  const SVG = 'http://www.w3.org/2000/svg';
  const el = (tag, attrs, text) => {
    const e = tag.startsWith('svg:') ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const bytes = n => {
    for (const [u, s] of [['GiB', 2 ** 30], ['MiB', 2 ** 20], ['KiB', 2 ** 10]]) if (n >= s) return (n / s).toFixed(2) + ' ' + u;
    return n + ' B';
  };
  const root = document.getElementById('app');
  const m = data.model, t = data.totals;
  root.appendChild(el('h1', {}, 'qlora-compile inspect: ' + m.architecture));
  root.appendChild(el('p', {id: 'summary'}, `${m.path}: ${m.model_type}, ${m.num_hidden_layers} layers, ` +
    `${m.parameters.toLocaleString('en')} parameters in ${m.dtype}.`));
  root.appendChild(el('p', {id: 'totals'}, `${t.modules_quantized} modules quantized, ${t.modules_skipped} skipped: ` +
    `${bytes(t.bytes_before)} -> ${bytes(t.bytes_after)} (${t.bits_per_param} bits/param); ${t.graphs} graph(s), ` +
    `${t.nodes} nodes, ${t.graph_breaks} graph break(s); ` + Object.entries(t.passes).map(([k, v]) => k + ': ' + v).join(', ')));
  root.appendChild(el('p', {id: 'traced'}, data.note));
  if (data.traced.error) root.appendChild(el('p', {id: 'trace-error'}, 'Tracing failed: ' + data.traced.error));

  root.appendChild(el('h2', {}, 'Storage rewrite'));
  const table = el('table', {id: 'rewrites'});
  const head = el('tr');
  for (const h of ['module', 'kind', 'shape', 'status', 'before', 'after', 'bits/param']) head.appendChild(el('th', {}, h));
  table.appendChild(head);
  for (const r of data.rewrites) {
    const tr = el('tr', {class: 'rewrite ' + r.status});
    const cells = [r.name, r.kind, r.shape.join('x'), r.status === 'quantized' ? 'quantized' : 'skipped: ' + r.reason,
                   bytes(r.bytes_before), bytes(r.bytes_after), r.bits_per_param === null ? '-' : r.bits_per_param.toFixed(3)];
    for (const c of cells) tr.appendChild(el('td', {}, c));
    table.appendChild(tr);
  }
  root.appendChild(table);

  root.appendChild(el('h2', {}, 'Graph breaks'));
  const breaks = el('ul', {id: 'breaks'});
  for (const b of data.graph_breaks) breaks.appendChild(el('li', {class: 'break'}, b.reason + (b.where ? ' at ' + b.where : '') + (b.code ? ': ' + b.code : '')));
  if (!data.graph_breaks.length) breaks.appendChild(el('li', {}, 'none'));
  root.appendChild(breaks);

  root.appendChild(el('h2', {}, 'Graphs'));
  const legend = el('p', {class: 'legend'});
  for (const p of ['fuse_lora', 'fuse_shared_input', 'rewrite_storage', 'none'])
    legend.appendChild(el('span', {class: 'pass-' + p}, p === 'none' ? 'traced op' : p));
  root.appendChild(legend);

  const W = 190, H = 22, GX = 14, GY = 26;
  for (const g of data.graphs) {
    for (const mod of g.modules) {
      root.appendChild(el('h3', {}, `graph ${g.index}` + (mod.name ? ` / ${mod.name}` : '') + `: ${mod.nodes.length} nodes`));
      const nodes = mod.nodes, depth = new Array(nodes.length).fill(0);
      const isSource = n => n.op === 'placeholder' || n.op === 'get_attr';
      for (const n of nodes) {
        if (isSource(n)) continue;
        for (const i of n.inputs) if (!isSource(nodes[i])) depth[n.id] = Math.max(depth[n.id], depth[i] + 1);
      }
      const users = nodes.map(() => []);
      for (const n of nodes) for (const i of n.inputs) users[i].push(n.id);
      for (const n of nodes) if (isSource(n) && users[n.id].length)
        depth[n.id] = Math.max(0, Math.min(...users[n.id].map(u => depth[u])) - 1);
      const rows = {}, pos = {};
      for (const n of nodes) { const d = depth[n.id]; rows[d] = rows[d] || []; pos[n.id] = [rows[d].length, d]; rows[d].push(n.id); }
      const cols = Math.max(...Object.values(rows).map(r => r.length)), nrows = Math.max(...depth) + 1;
      const xy = id => [GX + pos[id][0] * (W + GX), GY / 2 + pos[id][1] * (H + GY)];
      const svg = el('svg:svg', {class: 'graph', 'data-graph': g.index, 'data-module': mod.name,
                                 width: GX + cols * (W + GX), height: GY + nrows * (H + GY)});
      for (const n of nodes) for (const i of n.inputs) {
        const [x1, y1] = xy(i), [x2, y2] = xy(n.id);
        const a = [x1 + W / 2, y1 + H], b = [x2 + W / 2, y2], my = (a[1] + b[1]) / 2;
        svg.appendChild(el('svg:path', {class: 'edge', d: `M${a[0]},${a[1]} C${a[0]},${my} ${b[0]},${my} ${b[0]},${b[1]}`}));
      }
      for (const n of nodes) {
        const [x, y] = xy(n.id);
        const cls = 'node pass-' + (n.pass || 'none') + (isSource(n) || n.op === 'output' ? ' io' : '');
        const node = el('svg:g', {class: cls, 'data-name': n.name, 'data-target': n.target, transform: `translate(${x},${y})`});
        const label = (n.op === 'call_function' || n.op === 'call_method' ? n.target : n.name) + (n.kernel ? ' [' + n.kernel + ']' : '');
        node.appendChild(el('svg:title', {}, `${n.name}: ${n.op} ${n.target}` + (n.shape ? ' -> [' + n.shape.join(', ') + ']' : '') +
                                              (n.pass ? ' (made by ' + n.pass + ')' : '')));
        node.appendChild(el('svg:rect', {width: W, height: H, rx: 4}));
        node.appendChild(el('svg:text', {x: 6, y: 15}, label.length <= 28 ? label : isSource(n) ? '\u2026' + label.slice(-27) : label.slice(0, 27) + '\u2026'));
        svg.appendChild(node);
      }
      const box = el('div', {class: 'graph-box'});
      box.appendChild(svg);
      root.appendChild(box);
    }
  }
  document.body.setAttribute('data-rendered', 'yes');
})();
"""


def render_html(result: dict) -> str:
    """A self-contained HTML page (inline CSS, JSON and script; nothing fetched) for `result`."""
    payload = json.dumps({**result, "note": traced_note(result)}).replace("</", "<\\/")
    title = f"qlora-compile inspect: {result['model']['architecture']}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<title>{title}</title><style>{_STYLE}</style></head>\n<body>\n<div id="app"></div>\n'
        f'<script type="application/json" id="inspect-data">{payload}</script>\n'
        f"<script>{_SCRIPT}</script>\n</body></html>\n"
    )
