"""A self-contained HTML report of one or more Step-Saliency results (e.g. baseline and StepFlow) on a trace.

``report.html`` is one file: images are base64 PNG data URIs, CSS and the small slider script are inline, and
nothing points outside the file (no scripts, fonts, style sheets or URLs), so it can be mailed or archived.
The figures are written next to it as well, as PNG (200 dpi) and, on request, PDF and SVG.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .. import figures
from . import describe, plots
from .result import StepSaliency

KIND_COLORS = plots.KIND_COLORS
SLIDER_DPI = 110  # one small PNG per layer per condition: keep the file a few MB even for 64-layer models

_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#222;
  background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:18px 26px 60px}
h1{font-size:1.6em;margin:.3em 0}
h2{font-size:1.25em;margin:1.6em 0 .5em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{font-size:1.05em;margin:1em 0 .3em}
.meta{color:#555;font-size:.92em}
.question{background:#fff;border-left:4px solid %(question)s;padding:.5em .9em;white-space:pre-wrap}
table{border-collapse:collapse;margin:.4em 0;background:#fff}
th,td{border:1px solid #ddd;padding:.35em .7em;text-align:left;vertical-align:top}
th{background:#f0f0f0}
td.num{font-variant-numeric:tabular-nums;font-weight:600}
td.na{color:#a33}
.legend span{display:inline-block;margin-right:1.2em}
.sw{display:inline-block;width:.9em;height:.9em;border-radius:2px;vertical-align:-.1em;margin-right:.3em}
.steps{background:#fff;border:1px solid #ddd;border-radius:4px;padding:.3em .5em}
.step{display:flex;gap:.6em;padding:.25em .2em;border-bottom:1px solid #f0f0f0}
.step:last-child{border-bottom:none}
.tag{flex:0 0 3.4em;font-weight:700;font-family:ui-monospace,Menlo,Consolas,monospace;text-align:right}
.ntok{flex:0 0 4.2em;color:#888;font-size:.85em;padding-top:.15em}
.text{white-space:pre-wrap;word-break:break-word;flex:1}
.k-question .tag{color:%(question)s} .k-thinking .tag{color:%(thinking)s} .k-summary .tag{color:%(summary)s}
.k-question{background:#f3f7fc} .k-summary{background:#f2f8f3}
details summary{cursor:pointer;color:#555}
.reading li{margin:.3em 0}
.slider{display:flex;align-items:center;gap:.6em;margin:.6em 0;flex-wrap:wrap}
.slider input[type=range]{flex:1;min-width:240px}
.slider button{font-size:1em;padding:.1em .6em}
#layer-label{font-weight:700;min-width:11em}
.conds{display:flex;flex-wrap:wrap;gap:14px}
.conds figure{margin:0;background:#fff;border:1px solid #ddd;padding:6px}
.conds figcaption{font-weight:700;text-align:center}
.layer-info{font-size:.9em;color:#444;min-height:1.5em}
img.full{max-width:100%%;height:auto;background:#fff;border:1px solid #ddd}
.note{color:#555;font-size:.92em}
"""

_JS = """
(function(){
  var data = JSON.parse(document.getElementById('layer-data').textContent);
  var slider = document.getElementById('layer');
  var label = document.getElementById('layer-label');
  var info = document.getElementById('layer-info');
  var imgs = document.querySelectorAll('img.layer-map');
  function show(l){
    l = Math.max(0, Math.min(data.layers.length - 1, l));
    slider.value = l;
    for (var i = 0; i < imgs.length; i++) imgs[i].hidden = (+imgs[i].getAttribute('data-layer') !== l);
    var d = data.layers[l];
    label.textContent = 'layer ' + l + (d.band ? ' \\u00b7 ' + d.band : '');
    info.textContent = d.text;
  }
  slider.addEventListener('input', function(){ show(+slider.value); });
  document.getElementById('prev').addEventListener('click', function(){ show(+slider.value - 1); });
  document.getElementById('next').addEventListener('click', function(){ show(+slider.value + 1); });
  document.addEventListener('keydown', function(e){
    if (document.activeElement === slider) return;  // the slider handles its own arrow keys
    if (e.key === 'ArrowLeft') show(+slider.value - 1);
    if (e.key === 'ArrowRight') show(+slider.value + 1);
  });
  show(0);
})();
"""

_HOW_TO_READ = """
<p><b>Step maps.</b> Each map is one layer. Row <i>i</i> is a query step (it receives), column <i>j</i> a key
step (it is looked at); a cell is the attention &times; gradient saliency flowing from step <i>j</i> into step
<i>i</i>. Colours are on one logarithmic scale shared by every layer and condition, so maps can be compared
directly. Grey cells above the diagonal have no causal pair (a step cannot look ahead). Pink lines separate the
question, the thinking steps and the summary.</p>
<p><b>Means count only causally valid pairs.</b> A cell of the mean map is the summed saliency divided by the
number of (query token, key token) pairs with the key not after the query. The diagonal blocks are therefore
not diluted by their empty upper triangle, unlike averaging the whole block (which roughly halves them).</p>
<p><b>Shallow Lock-in</b> is the mean, over the shallow band, of the share of a thinking step's incoming
saliency that comes from itself and the step before. Higher = the shallow layers are more locked into the
current step and look less at the question and older steps.</p>
<p><b>Deep Decay</b> is the mean, over the deep band, of the share of the summary's incoming saliency that
comes from the summary itself and the last two thinking steps. Higher = the summary relies more on itself and
the last steps, and less on the reasoning as a whole.</p>
<p>Both are shares of the summed map between steps; the first token (an attention sink that belongs to no step)
is left out and reported separately as the sink share. A score that a trace cannot have (no summary, a single
thinking step) is shown as n/a with the reason, never as 0. Compare scores between traces of the same model
(e.g. correct vs wrong answers, or without vs with StepFlow), not as absolute verdicts.</p>
"""


# -- small helpers -------------------------------------------------------------------------------------------
def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str, cls: str, extra: str = "") -> str:
    return f'<img class="{cls}" src="{_data_uri(png)}" alt="{_e(alt)}"{extra}>'


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "result"
    slug, k = base, 2
    while slug in taken:
        slug, k = f"{base}_{k}", k + 1
    taken.add(slug)
    return slug


def _json_script(obj) -> str:
    # "<" escaped so that no string in the data (step text, model name) can close the script element.
    return json.dumps(obj, ensure_ascii=False).replace("<", "\\u003c")


def _as_named(results) -> dict[str, StepSaliency]:
    if isinstance(results, StepSaliency):
        return {"Step-Saliency": results}
    if not isinstance(results, Mapping) or not results:
        raise ValueError("write_report needs a StepSaliency or a non-empty dict of name -> StepSaliency")
    return {str(k): v for k, v in results.items()}


# -- sections ------------------------------------------------------------------------------------------------
def _header(rs: dict[str, StepSaliency], trace, title: str | None) -> str:
    first = next(iter(rs.values()))
    meta = first.meta or {}
    model = meta.get("model") or getattr(trace, "model", None) or "unknown model"
    question = getattr(trace, "question", "") or meta.get("question", "")
    facts = [f"model <b>{_e(model)}</b>", f"{first.num_layers} layers", f"{len(first.steps)} steps"]
    if meta.get("tokens"):
        facts.append(f"{_e(meta['tokens'])} tokens")
    if meta.get("target"):
        facts.append(f"loss over {_e(meta['target'])} target tokens")
    parts = [f"<h1>{_e(title or 'Step-Saliency report')}</h1>", f'<p class="meta">{" &middot; ".join(facts)}</p>']
    if question:
        parts.append(f'<div class="question">{_e(question)}</div>')
    return "\n".join(parts)


def _legend() -> str:
    items = "".join(f'<span><i class="sw" style="background:{c}"></i>{k}</span>' for k, c in KIND_COLORS.items())
    return f'<p class="legend">{items}</p>'


def _display_text(step, trace) -> str:
    """A step's text for reading: control tokens (``<|im_end|>``, ...) hidden; the saved trace keeps them."""
    texts = getattr(trace, "token_texts", None)
    if texts is not None and step.end <= len(texts) and "".join(texts[step.start : step.end]) == step.text:
        return trace.display_text(step)  # token by token: only whole control tokens are left out
    from ..notebook import _SPECIAL

    return _SPECIAL.sub("", step.text)


def _trace_section(steps, trace, heading: str = "The trace", intro: str = "") -> str:
    rows = []
    for s in steps:
        if s.kind == "question" and getattr(trace, "question", ""):
            # The question step holds the whole templated prompt; show the user's question, the template on demand
            # (as tokenised, control tokens included: that is what it is there to show).
            text_html = (f"{_e(trace.question)}<details><summary>full prompt as tokenised (control tokens shown)"
                         f"</summary>{_e(s.text)}</details>")
        else:
            text_html = _e(_display_text(s, trace))
        rows.append(f'<div class="step k-{_e(s.kind)}"><span class="tag">{_e(s.label)}</span>'
                    f'<span class="ntok">{len(s)} tok</span><div class="text">{text_html}</div></div>')
    warns = "".join(f'<p class="note">warning: {_e(w)}</p>' for w in getattr(trace, "warnings", []) or [])
    return f'<h2>{_e(heading)}</h2>{intro}{_legend()}<div class="steps">{"".join(rows)}</div>{warns}'


def _score_cell(value: float | None, reason: str | None) -> str:
    if value is None:
        return f'<td class="na">n/a ({_e(reason or "not available")})</td>'
    return f'<td class="num">{value:.3f}</td>'


def _scores_section(rs: dict[str, StepSaliency], band_png: bytes) -> str:
    rows = []
    for name, r in rs.items():
        s = r.band_scores()
        rows.append(f"<tr><th>{_e(name)}</th>{_score_cell(s['shallow_lock_in'], s['shallow_lock_in_reason'])}"
                    f"{_score_cell(s['deep_decay'], s['deep_decay_reason'])}"
                    f"<td>{_e(describe.band_definition(r))}</td></tr>")
    table = ("<table><tr><th>condition</th><th>Shallow Lock-in</th><th>Deep Decay</th><th>bands</th></tr>"
             + "".join(rows) + "</table>")
    if len(rs) == 2:
        table = _side_by_side(rs) + f'<p class="note">{_e(describe.band_definition(next(iter(rs.values()))))}.</p>'
    note = ('<p class="note">Higher is worse for both: Shallow Lock-in = mean local share over the shallow band; '
            "Deep Decay = mean summary recency over the deep band.</p>")
    return f"<h2>Band scores</h2>{table}{note}{_img(band_png, 'band scores', 'full')}"


def _side_by_side(rs: dict[str, StepSaliency]) -> str:
    """One table for two conditions: a row per score or share, a column per condition and the change."""
    (n0, r0), (n1, r1) = rs.items()
    rows = []
    for row in describe.score_rows(r0, r1):
        a, b, d = row.cells()
        cls = "num" if row.change is not None else "na"
        rows.append(f"<tr><th>{_e(row.name)}</th><td>{_e(row.layers)}</td><td class=\"num\">{_e(a)}</td>"
                    f"<td class=\"num\">{_e(b)}</td><td class=\"{cls}\">{_e(d)}</td><td>{_e(row.what)}</td></tr>")
    return (f"<table><tr><th>score</th><th>layers</th><th>{_e(n0)}</th><th>{_e(n1)}</th>"
            f"<th>change</th><th>reading</th></tr>{''.join(rows)}</table>")


def _measured_section(rs: dict[str, StepSaliency], trace) -> str:
    """How a with-StepFlow result was measured, its resolved layers and what the edits did on this trace."""
    parts = []
    for name, r in rs.items():
        if not (r.meta or {}).get("stepflow"):
            continue
        parts.append(f"<h3>{_e(name)}</h3>" if len(rs) > 2 else "")
        parts.append(f"<p>{_e(describe.measurement(trace, r))}</p>")
        activity = r.meta.get("stepflow_activity")
        if activity is not None:
            resolved = describe.stepflow_of(r)
            parts.append("<p><b>What the edits did on this trace</b> (one teacher-forced pass):</p><ul>"
                         + "".join(f"<li>{_e(x)}</li>" for x in describe.activity_lines(activity, resolved))
                         + "</ul>" + _edits_table(activity))
    return "<h2>How this was measured</h2>" + "".join(parts) if parts else ""


def _edits_table(stats: dict) -> str:
    per_layer = {int(k): int(v) for k, v in (stats.get("oeb_edits_per_layer") or {}).items()}
    if not per_layer:
        return ""
    head = "".join(f"<th>{k}</th>" for k in sorted(per_layer))
    cells = "".join(f'<td class="num">{per_layer[k]:,}</td>' for k in sorted(per_layer))
    return (f"<table><tr><th>OEB layer</th>{head}</tr><tr><th>edited head-queries</th>{cells}</tr></table>")


def _difference_section(names: tuple[str, str], png: bytes, shifts: str | None) -> str:
    note = (f"Each cell is the share of a query step's (row's) incoming saliency that comes from a key step "
            f"(column), {names[1]} minus {names[0]}, in percentage points, on one diverging scale for all layers "
            "(red: more, blue: less; each row sums to zero). The step maps above share a log scale spanning "
            "decades, on which changes of a few points do not show; this map shows them.")
    return (f"<h2>What changed: {_e(names[1])} &minus; {_e(names[0])}</h2><p class=\"note\">{_e(note)}</p>"
            + (f"<p>{_e(shifts)}</p>" if shifts else "")
            + _img(png, f"difference maps {names[1]} minus {names[0]}", "full"))


def _generated_section(generated, trace) -> str:
    """The trace generated with StepFlow on (--generate-with-stepflow), with what StepFlow did while writing it."""
    stats = (generated.meta or {}).get("stepflow")
    items = [describe.divergence(trace, generated)] if trace is not None else []
    items += describe.activity_lines(stats)
    intro = ("<p>Generated from the same prompt with the same sampling settings, StepFlow on. Its Step-Saliency is "
             "not part of this report (its tokens differ, so maps would mix the trace and the condition); run "
             "<code>stepscope diagnose --trace trace_stepflow.json --stepflow</code> for it.</p><ul>"
             + "".join(f"<li>{_e(x)}</li>" for x in items) + "</ul>")
    steps = [s for s in generated.steps if s.kind != "question"]  # the question is the one above
    return _trace_section(steps, generated, heading="The trace generated with StepFlow", intro=intro)


def _flow_section(*traces) -> str:
    """The live flow monitor's record (``meta["flow"]``) of a trace generated with StepFlow, if one is shown."""
    from ..stepflow.monitor import FlowRecord

    for t in traces:
        rec = FlowRecord.of(t) if t is not None else None
        if rec is not None and rec.steps:
            break
    else:
        return ""

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def bar(x):
        w = 0 if x is None else max(0.0, min(1.0, x)) * 100
        return f'<span style="display:inline-block;height:.7em;width:{w:.0f}px;background:#4c78a8"></span>'

    rows = "".join(f"<tr><td>{_e(st.label)}</td><td>{st.tokens}</td><td>{pct(st.oeb_before)}</td>"
                   f"<td>{pct(st.oeb_after)} {bar(st.oeb_after)}</td><td>{pct(st.smi_before)}</td></tr>"
                   for st in rec.steps)
    ranges = f"OEB band: layers {_e(_layer_list(rec.oeb_layers))}; SMI band: layers {_e(_layer_list(rec.smi_layers))}"
    return ("<h2>Flow while it was written</h2><p class=\"note\">The live flow monitor: per thinking step, the mean "
            "attention mass on the bridge (the question), over the band's layers, heads and the step's tokens, as "
            f"recorded while decoding (no gradients). {ranges}. SMI edits attention outputs, not weights, so its "
            "band has one mass.</p><table><tr><th>step</th><th>tokens</th><th>OEB band before</th>"
            f"<th>OEB band after</th><th>SMI band</th></tr>{rows}</table>")


def _layer_list(layers) -> str:
    return ",".join(str(x) for x in layers) or "none"


def _reading_section(rs: dict[str, StepSaliency]) -> str:
    parts = ["<h2>Reading</h2>"]
    for name, r in rs.items():
        if len(rs) > 1:
            parts.append(f"<h3>{_e(name)}</h3>")
        parts.append('<ul class="reading">' + "".join(f"<li>{_e(s)}</li>" for s in describe.reading(r)) + "</ul>")
    if len(rs) == 2:
        (n0, r0), (n1, r1) = rs.items()
        parts.append(f"<h3>{_e(n0)} &rarr; {_e(n1)}</h3>")
        parts.append('<ul class="reading">' + "".join(f"<li>{_e(s)}</li>" for s in describe.compare(r0, r1, (n0, n1)))
                     + "</ul>")
    return "".join(parts)


def _layer_text(rs: dict[str, StepSaliency], layer: int) -> str:
    """One line per layer for the slider: each condition's shares at this layer."""
    names = {"question_reach": "question reach", "local_share": "local share",
             "summary_thinking_share": "summary\u2190thinking", "summary_recency_share": "summary recency",
             "sink_share": "sink"}
    chunks = []
    for cond, r in rs.items():
        if layer >= r.num_layers:
            continue
        vals = []
        for metric, label in names.items():
            v = r.metrics.get(metric)
            if v is not None and np.isfinite(v[layer]):
                vals.append(f"{label} {describe.pct(float(v[layer]))}")
        prefix = f"{cond}: " if len(rs) > 1 else ""
        chunks.append(prefix + (", ".join(vals) or "no shares available"))
    return " | ".join(chunks)


def _slider_section(rs: dict[str, StepSaliency], layer_pngs: dict[str, list[bytes]]) -> str:
    first = next(iter(rs.values()))
    n_layers = max(r.num_layers for r in rs.values())
    figures = []
    for k, (name, pngs) in enumerate(layer_pngs.items()):
        imgs = "".join(
            _img(png, f"{name} layer {layer}", "layer-map",
                 f' data-cond="{k}" data-layer="{layer}"' + ("" if layer == 0 else " hidden"))
            for layer, png in enumerate(pngs))
        caption = f"<figcaption>{_e(name)}</figcaption>" if len(rs) > 1 else ""
        figures.append(f"<figure>{caption}{imgs}</figure>")
    data = {"layers": [{"band": plots.layer_band(first.bands, layer) or "", "text": _layer_text(rs, layer)}
                       for layer in range(n_layers)]}
    controls = (f'<div class="slider"><button id="prev" type="button" aria-label="previous layer">&#9664;</button>'
                f'<input type="range" id="layer" min="0" max="{n_layers - 1}" value="0" step="1">'
                f'<button id="next" type="button" aria-label="next layer">&#9654;</button>'
                f'<span id="layer-label">layer 0</span></div>')
    return (f"<h2>Step maps, layer by layer</h2><p class=\"note\">Drag the slider or use the arrow keys; all "
            f"{n_layers} layers are embedded, on one colour scale.</p>{controls}"
            f'<div class="layer-info" id="layer-info"></div><div class="conds">{"".join(figures)}</div>'
            f'<script type="application/json" id="layer-data">{_json_script(data)}</script>')


def _grid_section(grids: dict[str, bytes], multi: bool) -> str:
    parts = ["<h2>All layers at a glance</h2>"]
    for name, png in grids.items():
        if multi:
            parts.append(f"<h3>{_e(name)}</h3>")
        parts.append(_img(png, f"step maps of {name}", "full"))
    return "".join(parts)


def _meta_section(rs: dict[str, StepSaliency]) -> str:
    rows = []
    for name, r in rs.items():
        m = r.meta or {}
        sf = m.get("stepflow")
        resolved = describe.stepflow_of(r)
        if resolved is not None and sf:  # the layers used, not the "null = default band" of the stored settings
            sf = {**sf, "oeb_layers": sorted(resolved.oeb_layers), "smi_layers": sorted(resolved.smi_layers)}
        bits = {
            "loss": f"{m['loss']:.4f}" if isinstance(m.get("loss"), (int, float)) else "",
            "seconds": m.get("seconds", ""),
            "StepFlow": f"{describe.stepflow_settings(r)} {json.dumps(sf, ensure_ascii=False)}" if sf else "off",
        }
        rows.append(f"<tr><th>{_e(name)}</th>" + "".join(f"<td>{_e(v)}</td>" for v in bits.values()) + "</tr>")
    return ('<details><summary>Run details</summary><table><tr><th>condition</th><th>loss</th><th>seconds</th>'
            f'<th>StepFlow config</th></tr>{"".join(rows)}</table></details>')


# -- the report ----------------------------------------------------------------------------------------------
def _diff_pair(rs: dict[str, StepSaliency]) -> tuple[str, str] | None:
    """The two condition names a difference map is drawn for: exactly two results on the same steps."""
    if len(rs) != 2:
        return None
    (n0, r0), (n1, r1) = rs.items()
    same = [(s.kind, s.start, s.end) for s in r0.steps] == [(s.kind, s.start, s.end) for s in r1.steps]
    return (n0, n1) if same and r0.num_layers == r1.num_layers else None


def _render_pngs(rs: dict[str, StepSaliency], out_dir: Path, kind: str, formats=("png",),
                 progress: bool = True) -> dict:
    """Render every picture once: keep the PNG bytes for embedding, write each figure in ``formats``. The
    per-layer slider maps take most of the time, so the bar counts them one by one."""
    from ..progress import bar

    pair = _diff_pair(rs)
    total = sum(r.num_layers + 1 for r in rs.values()) + 2 + (pair is not None)
    ticker = bar(total, "report", "figure", enabled=progress)
    norm = plots.map_norm(rs, None, kind)  # one scale for all layers of all conditions
    slugs: set[str] = set()
    grids: dict[str, bytes] = {}
    layer_pngs: dict[str, list[bytes]] = {}
    try:
        for name, r in rs.items():
            fig = plots.plot_layer_maps(r, kind=kind, norm=norm,
                                        title=f"{name}: step maps ({kind})" if len(rs) > 1 else None)
            grids[name] = plots.figure_png(fig)
            stem = "layer_maps" if len(rs) == 1 else f"layer_maps_{_slug(name, slugs)}"
            figures.save_formats(fig, out_dir / stem, formats, png=grids[name])
            ticker.update(1)
            layer_pngs[name] = plots.layer_map_pngs(r, norm, kind=kind, dpi=SLIDER_DPI,
                                                    on_png=lambda layer: ticker.update(1))
        curves_fig = plots.plot_metric_curves(rs if len(rs) > 1 else next(iter(rs.values())))
        bands_fig = plots.plot_band_scores(rs)
        curves, bands = plots.figure_png(curves_fig), plots.figure_png(bands_fig)
        figures.save_formats(curves_fig, out_dir / "metric_curves", formats, png=curves)
        ticker.update(1)
        figures.save_formats(bands_fig, out_dir / "band_scores", formats, png=bands)
        ticker.update(1)
        diff = None
        if pair is not None:
            from .diffmap import plot_difference_maps

            diff_fig = plot_difference_maps(rs[pair[0]], rs[pair[1]], names=pair)
            diff = plots.figure_png(diff_fig)
            figures.save_formats(diff_fig, out_dir / "difference_maps", formats, png=diff)
            ticker.update(1)
    finally:
        ticker.close()
    return {"grids": grids, "layers": layer_pngs, "curves": curves, "bands": bands, "diff": diff, "pair": pair}


def write_report(results: Mapping[str, StepSaliency] | StepSaliency, trace=None, out_dir=".", *,
                 title: str | None = None, kind: str = "mean", formats=("png",), stepflow_trace=None,
                 progress: bool = True) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and the figures next to it; return the HTML path.

    ``results``: name -> StepSaliency, e.g. ``{"baseline": r0, "StepFlow": r1}`` (results of the same trace); with
    two, the report also compares them. ``trace``: the ``Trace`` they were computed on (for the question and
    warnings; the step texts come from the results). ``kind``: ``"mean"`` or ``"sum"`` maps. ``formats``: the
    files written per figure, any of ``"png"``, ``"pdf"``, ``"svg"`` (the HTML embeds PNGs either way).

    With a result measured with StepFlow (``meta["stepflow"]``), the report says how it was measured and, when
    ``meta["stepflow_activity"]`` holds StepFlow's statistics, what the edits did; two results on the same steps
    also get a difference map. ``stepflow_trace``: a trace of the same prompt generated with StepFlow on, shown
    with what StepFlow did while writing it. ``progress``: a progress bar on stderr while the figures render.
    """
    rs = _as_named(results)
    formats = figures.parse_formats(formats)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = _render_pngs(rs, out_dir, kind, formats, progress)
    first = next(iter(rs.values()))
    pair = pngs["pair"]
    shifts = describe.largest_shifts_text(rs[pair[0]], rs[pair[1]], pair) if pair else None
    css = _CSS % KIND_COLORS
    body = "\n".join([
        _header(rs, trace, title),
        _scores_section(rs, pngs["bands"]),
        _measured_section(rs, trace),
        _reading_section(rs),
        _difference_section(pair, pngs["diff"], shifts) if pair else "",
        _trace_section(first.steps, trace),
        _generated_section(stepflow_trace, trace) if stepflow_trace is not None else "",
        _flow_section(trace, stepflow_trace),
        _slider_section(rs, pngs["layers"]),
        "<h2>Shares per layer</h2>" + _img(pngs["curves"], "metric curves", "full"),
        _grid_section(pngs["grids"], len(rs) > 1),
        "<h2>How to read this</h2>" + _HOW_TO_READ,
        _meta_section(rs),
    ])
    doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
           f'<meta name="viewport" content="width=device-width, initial-scale=1">'
           f"<title>{_e(title or 'Step-Saliency report')}</title><style>{css}</style></head>"
           f"<body><main>\n{body}\n</main><script>{_JS}</script></body></html>\n")
    path = out_dir / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path
