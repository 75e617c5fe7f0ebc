"""Notebook views: HTML for ``Trace`` and ``StepSaliency``, short reprs, and pandas tables of results.

The classes only delegate here (``Trace._repr_html_``, ``StepSaliency.to_pandas``, ...). Jupyter calls
``_repr_html_`` on the last value of a cell, so ``trace`` or ``sal`` alone shows the coloured steps or the band
scores, one layer's step map and the metric curves. The HTML uses inline styles only (notebook front ends keep
those) and nothing outside itself. Pictures need matplotlib (``[report]``); without it the map and the curves
are HTML tables. Tables need pandas (``[notebook]``). Both are imported only when used.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .extras import require

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas

    from .evaluation.summary import Summary
    from .saliency.result import StepSaliency
    from .trace import Trace

__all__ = ["display_text", "is_special_text", "results_to_pandas", "saliency_frame", "saliency_html",
           "saliency_repr", "summary_frame", "trace_html", "trace_repr"]

# Control tokens of the chat formats in use: ChatML / Llama 3 / harmony ``<|...|>``, DeepSeek ``<｜...｜>``, the
# SentencePiece and Gemma markers, Mistral's [INST], and the thinking markers (the colours already show where
# thinking starts and ends). Special tokens decode to exactly these texts, one token each.
_SPECIAL = re.compile(
    r"<\|[^<>|\s]{1,48}\|>|<｜[^<>｜]{1,48}｜>|</?s>|<(?:pad|unk|bos|eos|start_of_turn|end_of_turn)>|\[/?INST\]"
    r"|</?think>"
)
MAX_TABLE_STEPS = 80  # a larger step map as an HTML table would be unreadable; the picture has no such limit
NOTEBOOK_DPI = 144  # 1.5x the 96 px/in a browser assumes: sharp on high-density screens, small enough to embed
_PX_PER_INCH = 96
_VIRIDIS = ("#440154", "#414487", "#2a788e", "#22a884", "#7ad151", "#fde725")  # anchors of the map colour scale


# -- text ------------------------------------------------------------------------------------------------------
def is_special_text(text: str) -> bool:
    """True when a token's text is a control token (``<|im_end|>``, ``</s>``, ``<think>``, ...)."""
    return _SPECIAL.fullmatch(text.strip()) is not None


def display_text(token_texts: Iterable[str]) -> str:
    """The text of some tokens with control tokens left out (the ids keep them; this is for reading)."""
    return "".join(t for t in token_texts if not is_special_text(t))


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _ranges(labels: list[str]) -> str:
    """``Q, T1-T9, S1-S2`` from step labels (each kind's steps are numbered 1, 2, ... in order)."""
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(label[0], []).append(label)
    parts = [g[0] if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups.values()]
    return ", ".join(parts)


def _tint(color: str, keep: float) -> str:
    """``color`` mixed with white, ``keep`` of the colour left (light backgrounds that text stays readable on)."""
    rgb = [int(color[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(255 - keep * (255 - c)):02x}" for c in rgb)


def _kind_colors() -> dict[str, str]:
    from .saliency.plots import (
        KIND_COLORS,  # one palette for the plots, the report and the notebook
    )

    return KIND_COLORS


def _legend(colors: Mapping[str, str]) -> str:
    items = "".join(f'<span style="margin-right:1.2em"><span style="display:inline-block;width:.9em;height:.9em;'
                    f'border-radius:2px;vertical-align:-.1em;margin-right:.3em;background:{_tint(c, 0.35)};'
                    f'border:1px solid {c}"></span>{_e(k)}</span>' for k, c in colors.items())
    return f'<div style="margin:.3em 0;font-size:.9em">{items}</div>'


# -- Trace -----------------------------------------------------------------------------------------------------
def trace_repr(trace: Trace) -> str:
    """One line: model, profile, token counts, step labels, the start of the question; no ids."""
    n_resp = len(trace.token_ids) - trace.prompt_len
    bits = [f"model={trace.model!r}", f"profile={trace.profile!r}",
            f"tokens={len(trace.token_ids)} (prompt {trace.prompt_len}, response {n_resp})",
            f"steps=[{_ranges(trace.labels)}]"]
    question = trace.question or display_text(trace.token_texts[: trace.prompt_len])
    if question:
        bits.append(f"question={_short(question, 60)!r}")
    if trace.warnings:
        bits.append(f"warnings={len(trace.warnings)}")
    return f"Trace({', '.join(bits)})"


def trace_html(trace: Trace, max_height_em: int = 36) -> str:
    """The trace with each step on a coloured background (alternating shades within a segment), its label in
    front and its token span on hover; a segment legend; control tokens hidden."""
    colors = _kind_colors()
    kinds = [k for k in ("question", "thinking", "summary") if trace.steps_of(k)]
    n_resp = len(trace.token_ids) - trace.prompt_len
    counts = ", ".join(f"{len(trace.steps_of(k))} {k}" for k in kinds) or "no steps"
    head = (f"<b>Trace</b> &middot; {_e(trace.model or 'model ?')} &middot; profile {_e(trace.profile)} &middot; "
            f"{len(trace.token_ids)} tokens (prompt {trace.prompt_len}, response {n_resp}) &middot; "
            f"steps: {_e(counts)}")
    spans = []
    for s in trace.steps:
        color = colors.get(s.kind, "#777777")
        shade = 0.22 if s.index % 2 else 0.12
        if s.kind == "question":
            text = trace.question or display_text(trace.token_texts[s.start : s.end]).strip()
        else:
            text = display_text(trace.token_texts[s.start : s.end])
        tip = f"{s.label}: tokens {s.start}-{s.end - 1} ({len(s)} tokens)"
        tag = (f'<span style="font:700 .75em ui-monospace,Menlo,Consolas,monospace;color:{color};'
               f'margin-right:.25em">{_e(s.label)}</span>')
        shown = text.lstrip()
        lead = text[: len(text) - len(shown)]  # line breaks before a step stay outside it: its label starts it
        spans.append(f'{_e(lead)}<span title="{_e(tip)}" style="background:{_tint(color, shade)};'
                     f'border-radius:3px;padding:.05em .15em;box-decoration-break:clone;'
                     f'-webkit-box-decoration-break:clone">{tag}{_e(shown)}</span>')
        if s.kind == "question":
            spans.append("\n\n")  # the user's question stands apart from the response
    body = "".join(spans)
    warns = "".join(f'<div style="color:#a33;font-size:.9em">warning: {_e(w)}</div>' for w in trace.warnings)
    return (f'<div class="stepscope-trace" style="font-family:system-ui,sans-serif;line-height:1.55">'
            f'<div style="font-size:.92em;color:#444">{head}</div>{_legend({k: colors[k] for k in kinds})}'
            f'<div style="white-space:pre-wrap;word-break:break-word;border:1px solid #ddd;border-radius:4px;'
            f'padding:.5em .7em;max-height:{max_height_em}em;overflow:auto;background:#fff;color:#222">{body}</div>'
            f"{warns}</div>")


# -- StepSaliency ----------------------------------------------------------------------------------------------
def _score_text(value: float | None, reason: str | None) -> str:
    return f"{value:.3f}" if value is not None else f"n/a ({reason or 'not available'})"


def saliency_repr(result: StepSaliency) -> str:
    """One line: model, layers, steps, both band scores with their layers; no arrays."""
    from .saliency.describe import band_text

    s, b = result.band_scores(), result.bands
    bits = [f"model={(result.meta or {}).get('model')!r}", f"layers={result.num_layers}",
            f"steps={len(result.steps)} [{_ranges(result.labels)}]"]
    if (result.meta or {}).get("tokens"):
        bits.append(f"tokens={result.meta['tokens']}")
    bits += [(f"shallow_lock_in={_score_text(s['shallow_lock_in'], s['shallow_lock_in_reason'])} "
              f"(layers {band_text(b.shallow)})"),
             f"deep_decay={_score_text(s['deep_decay'], s['deep_decay_reason'])} (layers {band_text(b.deep)})"]
    if (result.meta or {}).get("stepflow"):
        bits.append("stepflow=on")
    return f"StepSaliency({', '.join(bits)})"


def _have_matplotlib() -> bool:
    try:
        require("matplotlib", "pictures")
    except ImportError:
        return False
    return True


def _img(fig) -> str:
    from .figures import figure_bytes

    width = round(fig.get_figwidth() * _PX_PER_INCH)  # the natural size, so 8 pt text reads as 8 pt
    data = base64.b64encode(figure_bytes(fig, "png", NOTEBOOK_DPI)).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" style="width:{width}px;max-width:100%;height:auto">'


def _viridis(x: float) -> str:
    """A colour of the map scale for ``x`` in [0, 1] (linear between the anchors of viridis)."""
    x = min(max(x, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(x), len(_VIRIDIS) - 2)
    a = [int(_VIRIDIS[i][k : k + 2], 16) for k in (1, 3, 5)]
    b = [int(_VIRIDIS[i + 1][k : k + 2], 16) for k in (1, 3, 5)]
    t = x - i
    return "#" + "".join(f"{round(u + t * (v - u)):02x}" for u, v in zip(a, b))


def step_map_table(result: StepSaliency, layer: int, kind: str = "mean") -> str:
    """One layer's step map as an HTML table (no matplotlib needed): a log colour scale over this layer's valid
    cells, the value on hover, grey where there is no causal pair."""
    from .saliency.plots import step_map

    colors = _kind_colors()
    m = step_map(result, layer, kind)
    S = len(result.steps)
    if S > MAX_TABLE_STEPS:
        return (f"<p>{S} steps are too many for a table; install matplotlib for the picture "
                f"(<code>pip install 'stepscope[report]'</code>).</p>")
    pos = m[np.isfinite(m) & (m > 0)]
    lo, hi = (np.log10(pos.min()), np.log10(pos.max())) if pos.size else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    labels = [s.label for s in result.steps]
    cell = "width:1.4em;height:1.4em;padding:0;border:1px solid #fff"
    head = "".join(f'<th style="font-size:.7em;color:{colors.get(s.kind, "#000")};padding:0 1px">{_e(s.label)}</th>'
                   for s in result.steps)
    rows = []
    for i, s in enumerate(result.steps):
        tds = []
        for j in range(S):
            v = m[i, j]
            if not np.isfinite(v):
                tds.append(f'<td style="{cell};background:#d9d9d9"></td>')
                continue
            shade = _viridis((np.log10(v) - lo) / span) if v > 0 else _VIRIDIS[0]
            tds.append(f'<td title="{_e(labels[i])} &larr; {_e(labels[j])}: {v:.3g}" '
                       f'style="{cell};background:{shade}"></td>')
        rows.append(f'<tr><th style="font-size:.7em;color:{colors.get(s.kind, "#000")};text-align:right;'
                    f'padding:0 3px">{_e(s.label)}</th>{"".join(tds)}</tr>')
    return (f'<table style="border-collapse:collapse;margin:0"><tr><th></th>{head}</tr>{"".join(rows)}</table>'
            f'<div style="font-size:.8em;color:#555">layer {layer}: rows receive, columns are looked at; '
            f"log colour scale {10 ** lo:.2g} (dark) to {10 ** hi:.2g} (bright)</div>")


def _metrics_table(result: StepSaliency) -> str:
    from .saliency.plots import layer_band

    shown = {m: v for m, v in result.metrics.items() if v is not None}  # metrics the trace cannot have: left out
    head = "".join(f"<th>{_e(m)}</th>" for m in shown)
    rows = []
    for layer in range(result.num_layers):
        vals = "".join(f"<td>{v[layer]:.3f}</td>" for v in shown.values())
        rows.append(f"<tr><th>{layer}</th><td>{_e(layer_band(result.bands, layer) or '')}</td>{vals}</tr>")
    return (f'<table style="font-size:.85em"><tr><th>layer</th><th>band</th>{head}</tr>{"".join(rows)}</table>')


def saliency_html(result: StepSaliency, layer: int | None = None) -> str:
    """Band scores with their layers, one layer's step map and the per-layer metric curves.

    ``layer``: default the first deep-band layer. Pictures when matplotlib is installed, HTML tables otherwise.
    """
    from .saliency import plots
    from .saliency.describe import band_definition, band_text

    layer = plots.default_layer(result) if layer is None else layer
    meta = result.meta or {}
    s = result.band_scores()
    facts = [_e(meta.get("model") or "model ?"), f"{result.num_layers} layers",
             f"{len(result.steps)} steps ({_e(_ranges(result.labels))})"]
    if meta.get("tokens"):
        facts.append(f"{_e(meta['tokens'])} tokens")
    if meta.get("stepflow"):
        facts.append("StepFlow on")
    td = "padding:.3em .7em;border:1px solid #ddd;text-align:left"

    def score_row(name: str, key: str, what: str) -> str:
        value = s[key]
        shown = (f'<b>{value:.3f}</b>' if value is not None
                 else f'<span style="color:#a33">n/a ({_e(s[key + "_reason"])})</span>')
        return f'<tr><th style="{td}">{name}</th><td style="{td}">{shown}</td><td style="{td}">{what}</td></tr>'

    b = result.bands
    table = ('<table style="border-collapse:collapse;margin:.4em 0">'
             + score_row("Shallow Lock-in", "shallow_lock_in",
                         f"mean local share, layers {band_text(b.shallow)} (higher = more locked in)")
             + score_row("Deep Decay", "deep_decay",
                         f"mean summary recency, layers {band_text(b.deep)} (higher = worse)")
             + "</table>")
    band = plots.layer_band(b, layer)
    caption = f"Step map, layer {layer}" + (f" ({band} band)" if band else "")
    if _have_matplotlib():
        step_map = _img(plots.plot_step_map(result, layer))
        curves = _img(plots.plot_metric_curves(result))
    else:
        step_map = step_map_table(result, layer)
        curves = _metrics_table(result) + ('<div style="font-size:.8em;color:#555">install matplotlib for the '
                                           "pictures: <code>pip install 'stepscope[report]'</code></div>")
    hint = ("other layers: <code>stepscope.plot_step_map(result, layer=...)</code>; all numbers: "
            "<code>result.to_pandas()</code>")
    return (f'<div class="stepscope-saliency" style="font-family:system-ui,sans-serif;color:#222">'
            f'<div style="font-size:.92em;color:#444"><b>Step-Saliency</b> &middot; {" &middot; ".join(facts)}</div>'
            f'{table}<div style="font-size:.85em;color:#555">{_e(band_definition(result))}</div>'
            f'<div style="display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start;margin-top:.5em">'
            f'<div><div style="font-weight:600">{_e(caption)}</div>{step_map}</div>'
            f'<div><div style="font-weight:600">Shares per layer</div>{curves}</div></div>'
            f'<div style="font-size:.85em;color:#555;margin-top:.3em">{hint}</div></div>')


# -- pandas ------------------------------------------------------------------------------------------------------
def _pandas():
    return require("pandas", "to_pandas()")


def saliency_frame(result: StepSaliency) -> pandas.DataFrame:
    """Per-layer metrics: one row per layer (index ``layer``), a ``band`` column (shallow / deep / empty) and one
    column per metric; a metric the trace cannot have is NaN, with the reason in ``df.attrs["metric_reasons"]``."""
    from .saliency.metrics import METRICS
    from .saliency.plots import layer_band

    pd = _pandas()
    columns: dict[str, Any] = {"band": [layer_band(result.bands, i) or "" for i in range(result.num_layers)]}
    for name in METRICS:
        values = result.metrics.get(name)
        columns[name] = np.full(result.num_layers, np.nan) if values is None else np.asarray(values, float)
    df = pd.DataFrame(columns, index=pd.RangeIndex(result.num_layers, name="layer"))
    df.attrs["metric_reasons"] = dict(result.metric_reasons)
    df.attrs["band_scores"] = result.band_scores()
    return df


def summary_frame(summary: Summary) -> pandas.DataFrame:
    """One row per condition (index ``condition``): pass@1 and its interval, pass@k, tokens, and for each
    condition but the baseline the paired difference, its interval, the exact test's p-value, fixed / broken
    and the verdict (NaN / None for the baseline)."""
    pd = _pandas()
    comparisons = {c.condition: c for c in summary.comparisons}
    rows = []
    for c in summary.conditions:
        row: dict[str, Any] = {"condition": c.name, "problems": c.problems, "samples": c.samples,
                               "pass@1": c.pass1.estimate, "pass@1_low": c.pass1.low, "pass@1_high": c.pass1.high}
        row.update({f"pass@{k}": v for k, v in c.pass_at_k.items() if k != 1})
        row.update(mean_new_tokens=c.mean_new_tokens, truncated_share=c.truncated_share)
        cmp = comparisons.get(c.name)
        row.update(difference=cmp.difference.estimate if cmp else np.nan,
                   difference_low=cmp.difference.low if cmp else np.nan,
                   difference_high=cmp.difference.high if cmp else np.nan,
                   p_value=cmp.test.p_value if cmp else np.nan, test=cmp.test.method if cmp else None,
                   fixed=cmp.fixed if cmp else None, broken=cmp.broken if cmp else None,
                   verdict=cmp.verdict if cmp else None)
        rows.append(row)
    df = pd.DataFrame(rows).set_index("condition") if rows else pd.DataFrame()
    df.attrs["settings"] = dict(summary.settings)
    return df


def results_to_pandas(source) -> pandas.DataFrame:
    """Every sample of an eval run (a run directory with its shard files, or one results ``.jsonl``) as a row;
    nested fields are flattened with dots (``config.sampling.temperature``)."""
    from pathlib import Path

    from .errors import StepscopeError
    from .evaluation.store import merge_results

    pd = _pandas()
    if isinstance(source, (str, Path)) and not Path(source).exists():
        raise StepscopeError(f"no such file or directory: {source}")
    records, _ = merge_results(source)
    return pd.json_normalize(records, sep=".")
