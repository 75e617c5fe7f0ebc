"""The flow-analysis report: one self-contained HTML page per analysis, with its figures also written as files.

For each model: the correct-vs-wrong table (raw and length-adjusted tests side by side, paired and pooled, Holm,
the shuffled-boundary control, a verdict per score), the length distributions, per-layer curves with 95% bands
(group means, and the wrong - correct difference raw, adjusted and within problems), per-step-position curves,
group mean maps, the per-component mechanism check with its controls, and the failing-step comparison.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from .. import figures
from .scores import CURVE_METRICS, LENGTHS

TITLES = {
    "question_reach": "question reach (thinking step <- question)",
    "local_share": "local share (thinking step <- itself + previous)",
    "summary_thinking_share": "summary <- thinking segment",
    "summary_recency_share": "summary recency (summary <- itself + last 2 steps)",
    "thinking_block": "thinking x thinking block mean (authors')",
    "summary_block": "summary x summary block mean (authors')",
}
COLUMN_TITLES = {"paired_raw": "paired, raw", "paired_adjusted": "paired, length-adjusted", "pooled_raw": "pooled, raw",
                 "pooled_adjusted": "pooled, length-adjusted"}
GROUP_COLORS = {"correct": "#1f77b4", "wrong": "#d62728"}
DIFF_COLORS = {"diff_raw": "#7f7f7f", "diff_adjusted": "#2ca02c", "diff_paired": "#9467bd"}
COMPONENT_COLORS = {"oeb": "#1f77b4", "smi": "#d62728", "both": "#2ca02c", "oeb_random": "#aec7e8",
                    "smi_random": "#ff9896"}


def _figure(**kw):
    return figures.new_figure(**kw)


def _png(fig, stem: Path | None = None, formats=("png",)) -> bytes:
    """The PNG bytes to embed; with ``stem``, also ``stem.<fmt>`` for each format."""
    png = figures.figure_bytes(fig, "png")
    if stem is not None:
        figures.save_formats(fig, stem, formats, png=png)
    return png


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _none(v) -> np.ndarray:
    return np.array([np.nan if x is None else x for x in v], dtype=float)


# -- figures ----------------------------------------------------------------------------------------------------------
def plot_curves(model: dict):
    """Per metric: the two groups' per-layer means with 95% bands (top), and the difference wrong - correct raw,
    length-adjusted and within problems (bottom)."""
    metrics = [m for m in CURVE_METRICS if model["curves"].get(m)]
    fig = _figure(figsize=(3.2 * max(len(metrics), 1), 6.4))
    axes = np.atleast_2d(fig.subplots(2, max(len(metrics), 1), squeeze=False))
    for j, metric in enumerate(metrics):
        entry = model["curves"][metric]
        top, bottom = axes[0, j], axes[1, j]
        for g, color in GROUP_COLORS.items():
            b = entry.get(g)
            if b:
                x = np.arange(len(b["mean"]))
                top.plot(x, _none(b["mean"]), color=color, label=f"{g} (n={b['n']})")
                top.fill_between(x, _none(b["low"]), _none(b["high"]), color=color, alpha=0.2)
        for key, color in DIFF_COLORS.items():
            b = entry.get(key)
            if b:
                x = np.arange(len(b["mean"]))
                bottom.plot(x, _none(b["mean"]), color=color, label=key.replace("diff_", ""))
                bottom.fill_between(x, _none(b["low"]), _none(b["high"]), color=color, alpha=0.2)
                if b.get("sim_low") is not None:  # family-wise over the layers
                    bottom.plot(x, _none(b["sim_low"]), color=color, lw=0.7, ls="--")
                    bottom.plot(x, _none(b["sim_high"]), color=color, lw=0.7, ls="--")
        bottom.axhline(0, color="black", lw=0.8)
        for ax in (top, bottom):
            ax.axvspan(model["bands"]["shallow"][0] - 0.5, model["bands"]["shallow"][-1] + 0.5, color="#1f77b4",
                       alpha=0.06)
            ax.axvspan(model["bands"]["deep"][0] - 0.5, model["bands"]["deep"][-1] + 0.5, color="#ff7f0e", alpha=0.06)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
        top.set_title(TITLES.get(metric, metric), fontsize=9)
        bottom.set_xlabel("layer (shaded: shallow / deep band)", fontsize=8)
        if j == 0:
            top.set_ylabel("group mean", fontsize=9)
            bottom.set_ylabel("wrong - correct", fontsize=9)
            top.legend(fontsize=8)
            bottom.legend(fontsize=8)
    fig.suptitle(f"{model['model']}: per-layer curves with 95% bands (problem-clustered; dashed: simultaneous over "
                 "layers)", fontsize=10)
    return fig


def plot_lengths(model: dict):
    names = ("thinking_tokens", "thinking_steps", "summary_tokens")
    fig = _figure(figsize=(10, 3))
    axes = fig.subplots(1, len(names))
    for ax, name in zip(axes, names):
        entry = model["lengths"][name]
        vals = [np.array(entry[g]["values"]) for g in GROUP_COLORS if entry.get(g)]
        hi = max((v.max() for v in vals if v.size), default=1)
        bins = np.arange(0, hi + 2) - 0.5 if hi <= 30 else np.linspace(0, hi + 1, 30)
        for g, color in GROUP_COLORS.items():
            if entry.get(g):
                ax.hist(entry[g]["values"], bins=bins, density=True, alpha=0.45, color=color,
                        label=f"{g}: median {entry[g]['median']:g}")
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=8)
    fig.suptitle(f"{model['model']}: length distributions by outcome", fontsize=10)
    return fig


def plot_positions(model: dict):
    pos = model["step_positions"]
    fig = _figure(figsize=(6, 3.2))
    ax = fig.subplots()
    for g, color in GROUP_COLORS.items():
        rows = pos.get(g) or []
        k = np.array([r["k"] for r in rows])
        if not k.size:
            continue
        ax.plot(k, _none([r["mean"] for r in rows]), marker="o", color=color, label=g)
        ax.fill_between(k, _none([r["low"] for r in rows]), _none([r["high"] for r in rows]), color=color, alpha=0.2)
    ax.set_xlabel("thinking step k", fontsize=9)
    ax.set_ylabel("question share (shallow band)", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{model['model']}: flow from the question by step position (95% bands)", fontsize=9)
    return fig


def plot_mechanism(model: dict):
    """Per-layer change against the baseline for each component and control: question reach, local share, and
    SMI's boundary-token share from the finished step."""
    mech = model["mechanism"]
    panels = [("curves", "question_reach"), ("curves", "local_share"), ("curves", "summary_recency_share"),
              ("sites", "boundary_prev_share"), ("sites", "after_prev_share")]
    fig = _figure(figsize=(16, 3.4))
    axes = fig.subplots(1, len(panels))
    for ax, (kind, metric) in zip(axes, panels):
        for name, entry in mech["components"].items():
            c = entry.get(kind, {}).get(metric)
            if not c:
                continue
            x = np.arange(len(c["mean_change"]))
            color = COMPONENT_COLORS.get(name, "#333333")
            ax.plot(x, c["mean_change"], color=color, label=name, ls="--" if "random" in name else "-")
            if c.get("low") is not None:
                ax.fill_between(x, _none(c["low"]), _none(c["high"]), color=color, alpha=0.15)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(f"change in {metric.replace('_', ' ')}", fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{model['model']}: mechanism check, mean change per layer vs the baseline (same tokens; 95% bands "
                 "over traces)", fontsize=10)
    return fig


def plot_maps(model: dict):
    from matplotlib.colors import LogNorm

    coarse = {g: {b: np.array(_none_2d(m)) for b, m in v.items()} for g, v in model["coarse_maps"].items()}
    fig = _figure(figsize=(9, 8))
    axes = fig.subplots(2, 2)
    vals = np.concatenate([m[np.isfinite(m) & (m > 0)].ravel() for g in coarse.values() for m in g.values()])
    norm = LogNorm(vmin=np.percentile(vals, 2), vmax=np.percentile(vals, 99.5)) if vals.size else None
    labels = model["coarse_labels"]
    image = None
    for i, group in enumerate(("correct", "wrong")):
        for j, band in enumerate(("shallow", "deep")):
            ax = axes[i, j]
            m = np.ma.masked_invalid(coarse[group][band])
            image = ax.imshow(np.ma.masked_less_equal(m, 0), norm=norm, cmap="viridis")
            layers = model["bands"][band]
            n = model["n_correct"] if group == "correct" else model["n_wrong"]
            ax.set_title(f"{group} (n={n}), {band} layers {layers[0]}-{layers[-1]}", fontsize=9)
            ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=8)
            ax.set_yticks(range(len(labels)), labels, fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, label="mean saliency per token pair (log)")
    fig.suptitle(f"{model['model']}: mean step maps (thinking steps pooled into quarters by position)", fontsize=10)
    return fig


def _none_2d(m):
    return [[np.nan if x is None else x for x in row] for row in m]


# -- tables -----------------------------------------------------------------------------------------------------------
def _p(p) -> str:
    return "n/a" if p is None else (f"{p:.2g}" if p >= 0.001 else "<0.001")


def _v(x, sign: bool = False) -> str:
    """Four decimals for shares; significant digits for small values (the block means are of order 1e-5)."""
    if x is None:
        return "n/a"
    if x != 0 and abs(x) < 1e-3:
        return f"{x:+.3g}" if sign else f"{x:.3g}"
    return f"{x:+.4f}" if sign else f"{x:.4f}"


def _num(x, sign=False) -> str:
    return _v(x, sign)


def _mean_ci(c) -> str:
    return "n/a" if c is None else f"{_v(c['mean'])} [{_v(c['low'])}, {_v(c['high'])}] (n={c['n']})"


def _test_cell(t: dict) -> str:
    if t.get("p_value") is None:
        return f"<small>{html.escape(t.get('note') or 'n/a')}</small>"
    ci = "" if t.get("low") is None else f" [{_v(t['low'], True)}, {_v(t['high'], True)}]"
    extra = ""
    if t.get("effect", {}).get("rank_biserial") is not None:
        extra = f", r<sub>rb</sub> {t['effect']['rank_biserial']:+.2f}"
    elif t.get("effect", {}).get("dz") is not None:
        extra = f", d<sub>z</sub> {t['effect']['dz']:+.2f}"
    return (f"{_v(t['estimate'], True)}{ci}<br>p {_p(t['p_value'])}, Holm {_p(t['p_holm'])}{extra}<br>"
            f"<small>MDE {_num(t.get('mde'))} (at the Holm level {_num(t.get('mde_family'))}); n={t['n']}</small>")


def _control_cell(ctl: dict | None, headline: str) -> str:
    if not ctl:
        return "n/a"
    c = ctl.get(headline)
    base = f"score {_num(ctl.get('mean_real'))} real vs {_num(ctl.get('mean_shuffled'))} shuffled"
    if not c:
        return f"<small>{base}</small>"
    flag = "exceeds" if c["exceeds"] else "<b>does not exceed</b>"
    return (f"effect {_v(c['real'], True)} vs shuffled {_v(c['shuffled_mean'], True)} [{_v(c['shuffled_low'], True)}, "
            f"{_v(c['shuffled_high'], True)}]<br>p<sub>control</sub> {_p(c['p_control'])}: {flag}"
            f"<br><small>{base}</small>")


def score_table(model: dict) -> str:
    head = "".join(f"<th>{COLUMN_TITLES[c]}<br><small>wrong - correct</small></th>" for c in COLUMN_TITLES)
    rows = []
    for s in model["scores"]:
        cells = "".join(f"<td>{_test_cell(s['tests'][c])}</td>" for c in COLUMN_TITLES)
        rows.append(f"<tr><td><b>{html.escape(s['name'])}</b><br><small>{html.escape(s['meaning'])}</small></td>"
                    f"<td>{_mean_ci(s['correct'])}</td><td>{_mean_ci(s['wrong'])}</td>{cells}"
                    f"<td>{_control_cell(s['shuffled_boundary_control'], model['headline_test'])}</td>"
                    f"<td><small>{html.escape(s['verdict'])}</small></td></tr>")
    return (f"<table><tr><th>band score</th><th>correct: mean [95% CI]</th><th>wrong: mean [95% CI]</th>{head}"
            f"<th>shuffled-boundary control ({COLUMN_TITLES[model['headline_test']]})</th><th>verdict</th></tr>"
            f"{''.join(rows)}</table>")


def length_table(model: dict) -> str:
    rows = []
    for name in [n for n in (*LENGTHS, "loss") if n in model["lengths"]]:
        e = model["lengths"][name]

        def cell(g, e=e):
            d = e.get(g)
            return "n/a" if not d else f"{d['median']:.4g} [{d['q25']:.4g}, {d['q75']:.4g}], mean {d['mean']:.4g}"

        rows.append(f"<tr><td>{name.replace('_', ' ')}</td><td>{cell('correct')}</td><td>{cell('wrong')}</td>"
                    f"<td>{_test_cell(e['paired_raw'])}</td><td>{_test_cell(e['pooled_raw'])}</td></tr>")
    return ("<table><tr><th>length</th><th>correct: median [IQR]</th><th>wrong: median [IQR]</th>"
            "<th>paired (within problem)</th><th>pooled</th></tr>" + "".join(rows) + "</table>")


def mechanism_table(mech: dict) -> str:
    names = list(mech["components"])
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for score in next(iter(mech["components"].values()))["scores"]:
        cells = []
        for n in names:
            e = mech["components"][n]["scores"].get(score, {})
            if not e.get("n"):
                cells.append("<td>n/a</td>")
                continue
            ci = e.get("change_ci")
            ci_txt = "" if ci is None else f" [{_v(ci[0], True)}, {_v(ci[1], True)}]"
            std = e.get("standardised")
            sh = mech["components"][n]["shuffled_boundaries"].get(score, {}).get("mean_change")
            cells.append(f"<td>{_v(e['mean_change'], True)}{ci_txt}<br><small>{_v(e['before'])} -> {_v(e['after'])}; "
                         f"std. {_num(std, True)}; same direction {e.get('share_in_direction', 0):.0%}; "
                         f"shuffled-boundary change {_num(sh, True)}; n={e['n']}</small></td>")
        rows.append(f"<tr><td><b>{html.escape(score)}</b></td>{''.join(cells)}</tr>")
    return f"<table><tr><th>band score: mean change [95% CI]</th>{head}</tr>{''.join(rows)}</table>"


def control_table(mech: dict) -> str:
    rows = []
    for pair, scores in mech["controls"].items():
        for score, e in scores.items():
            flag = "yes" if e["exceeds"] else "no"
            rows.append(f"<tr><td>{html.escape(pair)}</td><td>{html.escape(score)}</td>"
                        f"<td>{_v(e['real_change'], True)}</td><td>{_v(e['control_change'], True)}</td>"
                        f"<td>{_v(e['difference'], True)} [{_v(e['difference_ci'][0], True)}, "
                        f"{_v(e['difference_ci'][1], True)}]</td>"
                        f"<td>{flag}</td></tr>")
    return ("<table><tr><th>edit vs control</th><th>score</th><th>real change</th><th>control change</th>"
            "<th>difference [95% CI]</th><th>real exceeds control</th></tr>" + "".join(rows) + "</table>")


def activation_table(acts: dict) -> str:
    if not acts or not acts.get("n"):
        return f"<p>{html.escape((acts or {}).get('note', 'not measured'))}</p>"
    rows = []
    for name, e in acts.items():
        if not isinstance(e, dict) or "kl_boundary" not in e:
            continue
        hb = e.get("hidden_change_boundary", {}).get("mean") or []
        ha = e.get("hidden_change_after", {}).get("mean") or []
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{_v(max(hb, default=0))}</td>"
                    f"<td>{_v(max(ha, default=0))}</td><td>{e['kl_boundary']['mean']:.2e} (max "
                    f"{e['kl_boundary']['max']:.2e})</td><td>{e.get('kl_after', {}).get('mean', float('nan')):.2e}"
                    "</td></tr>")
    return (f"<p>{html.escape(acts['what'])}; {acts['n']} traces.</p><table><tr><th>edit</th>"
            "<th>largest per-layer hidden change at the firing token</th><th>... over the step it opens</th>"
            "<th>KL at the firing token</th><th>KL over the step</th></tr>" + "".join(rows) + "</table>")


def failing_table(fs: dict) -> str:
    rows = []
    for what in ("question", "premise"):
        e = fs.get(what) or {}
        for cond in ("without_oeb", "with_oeb"):
            d = e.get(cond)
            if not d:
                continue
            if d.get("p_value") is None:
                rows.append(f"<tr><td>{what}</td><td>{cond}</td><td colspan=4>{d.get('problems', 0)} problems: too few"
                            "</td></tr>")
                continue
            rows.append(f"<tr><td>{what}</td><td>{cond.replace('_', ' ')}</td><td>{_v(d['mean_wrong'])}</td>"
                        f"<td>{_v(d['mean_correct'])}</td><td>{_v(d['mean_wrong_minus_correct'], True)} "
                        f"[{_v(d['ci'][0], True)}, "
                        f"{_v(d['ci'][1], True)}], p {_p(d['p_value'])}</td><td>{d['problems']} / {d['wrong_samples']}"
                        "</td></tr>")
        ch = e.get("oeb_change_at_failing_step")
        if ch:
            rows.append(f"<tr><td>{what}</td><td>OEB change at the failing step</td><td colspan=2></td>"
                        f"<td>{_v(ch['mean_change'], True)} [{_v(ch['ci'][0], True)}, {_v(ch['ci'][1], True)}]</td>"
                        f"<td>{ch['n']}"
                        "</td></tr>")
    return (f"<p>{html.escape(fs['what'])}. First wrong step by gold position: "
            f"{html.escape(json.dumps(fs['first_wrong_step']))}; "
            f"kinds {html.escape(json.dumps(fs['first_error_kinds']))}"
            f".</p><table><tr><th>flow from</th><th>condition</th><th>wrong (failing step)</th><th>correct (same gold "
            "step)</th><th>wrong - correct [95% CI], sign-flip p</th><th>problems / wrong samples</th></tr>"
            + "".join(rows) + "</table>")


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1500px;margin:2em auto;
padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;
padding:5px 7px;vertical-align:top}th{background:#f4f4f4}img{max-width:100%}small{color:#555}
.note{background:#fff8e6;border-left:4px solid #f0b400;padding:8px 12px}"""


def write_analysis_report(result, out_dir: Path, *, formats=("png",)) -> Path:
    """``out_dir/report.html`` (self-contained) and each figure as ``<name>_<i>.<fmt>`` for ``formats``."""
    formats = figures.parse_formats(formats)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = result.to_dict() if hasattr(result, "to_dict") else result
    from .api import _clean

    doc = _clean(doc)
    parts = ["<h1>Flow analysis: correct vs wrong traces</h1>",
             ("<p class=note>The paper's finding: wrong traces show more <b>Shallow Lock-in</b> and more <b>Deep "
             "Decay</b> than correct ones. Every score is tested four ways: within problems (the headline where "
             "problems have both outcomes) and pooled, each raw and adjusted for length and step structure. Shares of "
             "a sum map move with token counts, so a raw difference between groups of different length is not "
             "evidence by itself; the <i>net</i> scores subtract the share uniform saliency would give. 'Not "
             "detected' comes with the smallest effect the data could have detected.</p>"),
             f"<p><small>{html.escape(json.dumps(doc.get('config', {})))}</small></p>"]
    for i, m in enumerate(doc["models"]):
        pr = m["pairing"]
        parts.append(f"<h2>{html.escape(m['model'])} (condition {html.escape(m['condition'])})</h2>")
        parts.append(f"<p>{m['n_correct']} correct, {m['n_wrong']} wrong traces from {pr['problems']} problems "
                     f"({pr['samples_per_problem']['median']:g} samples per problem); "
                     f"{pr['problems_with_both_outcomes']} problems have both outcomes "
                     f"({pr['traces_in_paired_problems']} traces). Bands: shallow = layers "
                     f"{m['bands']['shallow'][0]}-{m['bands']['shallow'][-1]}, deep = {m['bands']['deep'][0]}-"
                     f"{m['bands']['deep'][-1]}. Headline test: {COLUMN_TITLES[m['headline_test']]}.</p>")
        parts.append(f"<p><small>{html.escape(m['holm_family'])} {html.escape(m['length_adjustment'])}</small></p>")
        parts.append(score_table(m))
        parts.append("<h3>Lengths by outcome</h3>" + length_table(m))
        parts.append(_img(_png(plot_lengths(m), out_dir / f"lengths_{i}", formats), "lengths"))
        parts.append("<h3>Per-layer curves</h3>")
        parts.append(_img(_png(plot_curves(m), out_dir / f"curves_{i}", formats), "curves"))
        if m["step_positions"].get("positions"):
            parts.append("<h3>By thinking-step position</h3>")
            parts.append(_img(_png(plot_positions(m), out_dir / f"positions_{i}", formats), "positions"))
        parts.append("<h3>Group mean maps</h3>")
        parts.append(_img(_png(plot_maps(m), out_dir / f"maps_{i}", formats), "maps"))
        if m.get("failing_step"):
            parts.append("<h3>The failing step</h3>" + failing_table(m["failing_step"]))
        mech = m.get("mechanism")
        if mech:
            parts.append(f"<h3>Mechanism check ({html.escape(mech['selection'])}), per component, same tokens</h3>"
                         "<p>Deterministic edits on fixed tokens: effect sizes only (mean change with a 95% interval "
                         "over traces, standardised change, share of traces moved in that direction).</p>")
            parts.append(mechanism_table(mech))
            parts.append("<h4>Real edit vs its control</h4>" + control_table(mech))
            parts.append(_img(_png(plot_mechanism(m), out_dir / f"mechanism_{i}", formats), "mechanism"))
            parts.append("<h4>Where SMI acts: hidden states and next-token distributions</h4>"
                         + activation_table(mech.get("activations")))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>stepscope flow analysis</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
