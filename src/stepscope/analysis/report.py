"""The flow-analysis report: curves with bootstrap bands, group mean maps, the statistics table (one HTML file)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from .compare import CURVE_METRICS, GroupComparison, MechanismResult

TITLES = {
    "question_reach": "question reach (thinking step <- question)",
    "local_share": "local share (thinking step <- itself + previous)",
    "summary_thinking_share": "summary <- thinking segment",
    "summary_recency_share": "summary recency (summary <- itself + last 2 steps)",
}
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]


def _figure(**kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def _png(fig, path: Path | None = None, dpi: int = 120) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def plot_curves(comparisons: list[GroupComparison]):
    """One panel per metric; x = relative depth so models of different depth share an axis."""
    fig = _figure(figsize=(12, 8))
    axes = fig.subplots(2, 2, sharex=True)
    for ax, metric in zip(axes.flat, CURVE_METRICS):
        for k, cmp in enumerate(comparisons):
            color = COLORS[k % len(COLORS)]
            x = np.arange(cmp.num_layers) / max(cmp.num_layers - 1, 1)
            for group, ls in (("correct", "-"), ("wrong", "--")):
                band = cmp.curves[metric][group]
                if band is None:
                    continue
                label = f"{cmp.model}: {group} (n={band.n})"
                ax.plot(x, band.mean, ls, color=color, lw=1.8, label=label)
                ax.fill_between(x, band.low, band.high, color=color, alpha=0.12 if group == "correct" else 0.07)
        first = comparisons[0]
        span = max(first.num_layers - 1, 1)
        ax.axvspan(-0.02, first.shallow[-1] / span + 0.01, color="#1f77b4", alpha=0.06)
        ax.axvspan(first.deep[0] / span - 0.01, 1.02, color="#ff7f0e", alpha=0.06)
        ax.set_title(TITLES[metric], fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("relative layer depth (0 = first, 1 = last); shaded: shallow and deep bands")
    for ax in axes[:, 0]:
        ax.set_ylabel("share of incoming saliency")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=9)
    fig.suptitle("Correct (solid) vs wrong (dashed) traces: mean per layer with 95% bootstrap bands")
    return fig


def plot_maps(cmp: GroupComparison):
    from matplotlib.colors import LogNorm

    fig = _figure(figsize=(9, 8))
    axes = fig.subplots(2, 2)
    vals = np.concatenate([m[np.isfinite(m) & (m > 0)].ravel() for g in cmp.coarse.values() for m in g.values()])
    norm = LogNorm(vmin=np.percentile(vals, 2), vmax=np.percentile(vals, 99.5)) if vals.size else None
    labels = cmp.coarse_labels
    image = None
    for i, group in enumerate(("correct", "wrong")):
        for j, band in enumerate(("shallow", "deep")):
            ax = axes[i, j]
            m = np.ma.masked_invalid(cmp.coarse[group][band])
            image = ax.imshow(np.ma.masked_less_equal(m, 0), norm=norm, cmap="viridis")
            layers = cmp.shallow if band == "shallow" else cmp.deep
            n = cmp.n_correct if group == "correct" else cmp.n_wrong
            ax.set_title(f"{group} (n={n}), {band} layers {layers[0]}-{layers[-1]}", fontsize=10)
            ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=8)
            ax.set_yticks(range(len(labels)), labels, fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, label="mean saliency per token pair (log)")
    fig.suptitle(f"{cmp.model}: mean step maps (thinking steps pooled into quarters by position)")
    return fig


def _fmt_p(p) -> str:
    return "n/a" if p is None else (f"{p:.2g}" if p >= 0.001 else "<0.001")


def _ci(c) -> str:
    return "n/a" if c is None else f"{c['mean']:.3f} [{c['low']:.3f}, {c['high']:.3f}] (n={c['n']})"


def _score_row(score) -> str:
    d = score.to_dict()
    mw, pr = d["mann_whitney"], d["paired"]
    p = "n/a" if mw is None else _fmt_p(mw["p"])
    effect = "n/a" if mw is None else f"{mw['rank_biserial']:+.2f}"
    paired = "n/a"
    if pr is not None:
        paired = (f"{pr['problems']} problems, wrong - correct {pr['mean_wrong_minus_correct']:+.3f}, "
                  f"p={_fmt_p(pr['wilcoxon_p'])}")
    elif score.paired_problems:
        paired = f"{score.paired_problems} problem(s): too few to test"
    return (f"<tr><td><b>{html.escape(score.name)}</b><br><small>{html.escape(score.meaning)}</small></td>"
            f"<td>{_ci(d['correct'])}</td><td>{_ci(d['wrong'])}</td><td>{p}</td><td>{effect}</td>"
            f"<td>{paired}</td><td>{html.escape(score.note)}</td></tr>")


def _table(cmp: GroupComparison) -> str:
    head = ("<tr><th>score (mean over its band)</th><th>correct: mean [95% CI]</th><th>wrong: mean [95% CI]</th>"
            "<th>Mann-Whitney p</th><th>effect (rank-biserial, wrong vs correct)</th>"
            "<th>paired (same problem)</th><th>note</th></tr>")
    return f"<table>{head}{''.join(_score_row(s) for s in cmp.scores)}</table>"


def _mechanism_table(mech: MechanismResult) -> str:
    rows = []
    for name, e in mech.scores.items():
        if "before" not in e:
            rows.append(f"<tr><td>{html.escape(name)}</td><td colspan=4>not available on these traces</td></tr>")
            continue
        ci = e.get("change_ci")
        ci_txt = "" if ci is None else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"
        rows.append(f"<tr><td><b>{html.escape(name)}</b><br><small>{html.escape(e['meaning'])}</small></td>"
                    f"<td>{e['before']:.3f}</td><td>{e['after']:.3f}</td><td>{e['mean_change']:+.3f}{ci_txt}</td>"
                    f"<td>{_fmt_p(e.get('wilcoxon_p'))} (n={e['n']})</td></tr>")
    head = ("<tr><th>score</th><th>without StepFlow</th><th>with StepFlow</th><th>mean change [95% CI]</th>"
            "<th>Wilcoxon p</th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;
padding:6px 8px;vertical-align:top}th{background:#f4f4f4}img{max-width:100%}small{color:#555}
.note{background:#fff8e6;border-left:4px solid #f0b400;padding:8px 12px}"""


def write_analysis_report(comparisons: list[GroupComparison], out_dir: Path, *, mechanism: dict | None = None,
                          settings: dict | None = None) -> Path:
    """``out_dir/report.html`` (self-contained) plus ``curves.png`` and ``maps_<i>.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = _png(plot_curves(comparisons), out_dir / "curves.png")
    parts = [f"<h1>Flow analysis: correct vs wrong traces</h1>",
             f"<p>{html.escape(', '.join(f'{c.model}: {c.n_correct} correct, {c.n_wrong} wrong' for c in comparisons))}"
             "</p>"]
    if settings:
        parts.append(f"<p><small>{html.escape(json.dumps(settings))}</small></p>")
    parts.append("<p class=note>The paper's finding: wrong traces show more <b>Shallow Lock-in</b> (higher "
                 "local share in shallow layers) and more <b>Deep Decay</b> (the summary leans on itself and the "
                 "last steps in deep layers) than correct ones. A p-value above 0.05 or a confidence interval "
                 "that includes no difference means this data does not show it.</p>")
    parts.append(f"<h2>Per-layer curves</h2><img alt='curves' src='data:image/png;base64,"
                 f"{base64.b64encode(curves).decode()}'>")
    for i, cmp in enumerate(comparisons):
        maps = _png(plot_maps(cmp), out_dir / f"maps_{i}.png")
        parts.append(f"<h2>{html.escape(cmp.model)}</h2>")
        parts.append(_table(cmp))
        parts.append(f"<img alt='maps' src='data:image/png;base64,{base64.b64encode(maps).decode()}'>")
        if mechanism and cmp.model in mechanism:
            m = mechanism[cmp.model]
            parts.append(f"<h3>Mechanism check: the same {m.n} wrong traces, teacher-forced without and with "
                         "StepFlow</h3><p>StepFlow should raise shallow question reach and lower deep summary "
                         "recency.</p>")
            parts.append(_mechanism_table(m))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>stepscope flow analysis</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
