"""Plain-language reading of a Step-Saliency result, a compact terminal block, and before/after comparison.

Every number in the text comes from the result (its metrics, band scores and sums); a metric the trace cannot
have is named with the reason, never written as 0.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np

from ..errors import StepscopeError
from .metrics import band_mean
from .result import StepSaliency

WIDTH = 100


# -- formatting ----------------------------------------------------------------------------------------------
def pct(x: float) -> str:
    """A share as a percentage: whole percent from 10%, one decimal below (small shares are the point here)."""
    v = 100.0 * x
    return f"{v:.0f}%" if abs(v) >= 10 else f"{v:.1f}%"


def band_text(band: range) -> str:
    return f"{band.start}" if len(band) == 1 else f"{band.start}-{band.stop - 1}"


def band_definition(result: StepSaliency) -> str:
    """E.g. ``shallow = layers 0-7 (bottom 25% of 30), deep = layers 22-29 (top 25%)``."""
    b = result.bands
    frac = f"{100 * b.fraction:g}%"
    return (f"shallow = layers {band_text(b.shallow)} (bottom {frac} of {b.num_layers}), "
            f"deep = layers {band_text(b.deep)} (top {frac})")


def _na(result: StepSaliency, metric: str) -> str:
    return f"n/a ({result.metric_reasons.get(metric, 'no value in the band')})"


def _band_value(result: StepSaliency, metric: str, band: range) -> float | None:
    return band_mean(result.metrics.get(metric), band)


def _indices(result: StepSaliency, kind: str) -> list[int]:
    return [i for i, s in enumerate(result.steps) if s.kind == kind]


# -- where the flow is weakest -------------------------------------------------------------------------------
def question_share_per_step(result: StepSaliency, layers: range) -> dict[str, float]:
    """Thinking step label -> its share of incoming saliency that comes from the question, averaged over
    ``layers`` (the per-step quantity that ``question_reach`` averages over steps)."""
    q = _indices(result, "question")
    if not q:
        return {}
    sums = result.sums[layers.start : layers.stop]
    out = {}
    for i in _indices(result, "thinking"):
        incoming = sums[:, i, : i + 1].sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(incoming > 0, sums[:, i, q[0]] / incoming, np.nan)
        if np.isfinite(share).any():
            out[result.steps[i].label] = float(np.nanmean(share))
    return out


def weakest_points(result: StepSaliency) -> dict:
    """The thinking step with the smallest question share in the shallow band and the layer with the lowest
    question reach (each None when not computable)."""
    out: dict = {"step": None, "step_share": None, "layer": None, "layer_reach": None}
    per_step = question_share_per_step(result, result.bands.shallow)
    if per_step:
        label = min(per_step, key=per_step.__getitem__)
        out["step"], out["step_share"] = label, per_step[label]
    reach = result.metrics.get("question_reach")
    if reach is not None and np.isfinite(reach).any():
        layer = int(np.nanargmin(reach))
        out["layer"], out["layer_reach"] = layer, float(reach[layer])
    return out


# -- sentences -----------------------------------------------------------------------------------------------
def _shallow_sentence(r: StepSaliency) -> str:
    band = r.bands.shallow
    reach = _band_value(r, "question_reach", band)
    lock = r.shallow_lock_in
    head = f"In the shallow layers ({band_text(band)}), "
    first = (f"the question receives {pct(reach)} of the saliency flowing into thinking steps" if reach is not None
             else f"the question's share of the saliency flowing into thinking steps is {_na(r, 'question_reach')}")
    second = (f"a thinking step takes on average {pct(lock)} of its incoming saliency from itself and the step "
              f"before (Shallow Lock-in = {lock:.2f})" if lock is not None
              else f"Shallow Lock-in is {_na(r, 'local_share')}")
    return head + first + "; " + second + "."


def _recency_phrase(r: StepSaliency) -> str:
    n = min(2, len(_indices(r, "thinking")))
    return {0: "itself", 1: "itself and the last thinking step", 2: "itself and the last two thinking steps"}[n]


def _deep_sentence(r: StepSaliency) -> str:
    band = r.bands.deep
    decay = r.deep_decay
    head = f"In the deep layers ({band_text(band)}), "
    if decay is None:
        return head + f"Deep Decay is {_na(r, 'summary_recency_share')}."
    thinking = _band_value(r, "summary_thinking_share", band)
    tail = (f", and {pct(thinking)} from the thinking segment as a whole" if thinking is not None
            else f"; its share from the thinking segment is {_na(r, 'summary_thinking_share')}")
    return (head + f"the summary draws {pct(decay)} of its saliency from {_recency_phrase(r)}" + tail
            + f" (Deep Decay = {decay:.2f}).")


def _weakest_sentence(r: StepSaliency, compact: bool = False) -> str | None:
    w = weakest_points(r)
    parts = []
    if w["step"] is not None and len(_indices(r, "thinking")) > 1:
        parts.append(f"{w['step']} gets {pct(w['step_share'])} from the question (least, shallow layers)"
                     if compact else
                     f"the thinking step that draws least on the question in the shallow layers is {w['step']} "
                     f"({pct(w['step_share'])} of its incoming saliency)")
    if w["layer"] is not None:
        parts.append(f"lowest question reach: layer {w['layer']} ({pct(w['layer_reach'])})" if compact else
                     f"question reach is lowest in layer {w['layer']} ({pct(w['layer_reach'])})")
    if not parts:
        return None
    return ("Weakest: " if compact else "Weakest flow: ") + "; ".join(parts) + "."


def _sink_sentence(r: StepSaliency) -> str | None:
    sink = r.metrics.get("sink_share")
    if sink is None or not np.isfinite(sink).any():
        return None
    top = int(np.nanargmax(sink))
    return (f"The first token (an attention sink, in no step) takes {pct(float(np.nanmean(sink)))} of all saliency "
            f"on average over layers (most in layer {top}: {pct(float(sink[top]))}); the shares above leave it out.")


def reading(result: StepSaliency) -> list[str]:
    """Plain-language sentences: the shallow band (question reach, Shallow Lock-in), the deep band (summary
    recency, Deep Decay), where the flow is weakest, and the sink's share."""
    sentences = [_shallow_sentence(result), _deep_sentence(result)]
    sentences += [s for s in (_weakest_sentence(result), _sink_sentence(result)) if s]
    return sentences


# -- terminal block ------------------------------------------------------------------------------------------
def _compact_labels(result: StepSaliency) -> str:
    """``Q T1..T40 S1`` instead of forty labels."""
    groups = []
    for kind in ("question", "thinking", "summary"):
        labels = [s.label for s in result.steps if s.kind == kind]
        if labels:
            groups.append(labels[0] if len(labels) == 1 else f"{labels[0]}..{labels[-1]}" if len(labels) > 3
                          else " ".join(labels))
    return " ".join(groups)


def _step_counts(result: StepSaliency) -> str:
    counts = [(kind, len(_indices(result, kind))) for kind in ("question", "thinking", "summary")]
    return ", ".join(f"{n} {kind}" if n else f"no {kind}" for kind, n in counts)


def _header(result: StepSaliency, trace) -> str:
    meta = result.meta or {}
    model = meta.get("model") or getattr(trace, "model", None) or "model ?"
    bits = [str(model), f"{result.num_layers} layers"]
    if meta.get("tokens"):
        bits.append(f"{meta['tokens']} tokens")
    if isinstance(meta.get("loss"), (int, float)):
        bits.append(f"loss {meta['loss']:.3f}")
    if meta.get("stepflow"):
        bits.append("StepFlow on")
    return "Step-Saliency: " + " | ".join(bits)


def _score_line(name: str, value: float | None, reason: str | None, what: str) -> str:
    if value is None:
        return f"{name:<16} n/a    ({reason})"
    return f"{name:<16} {value:.2f}   ({what})"


def terminal_summary(result: StepSaliency, trace=None, width: int = WIDTH) -> str:
    """A compact plain-text block for the command line (at most ~15 lines, ``width`` columns)."""
    scores = result.band_scores()
    b = result.bands
    lines = [
        _header(result, trace),
        f"Steps: {_step_counts(result)} ({_compact_labels(result)})",
        f"Bands: {band_definition(result)}",
        _score_line("Shallow Lock-in", scores["shallow_lock_in"], scores["shallow_lock_in_reason"],
                    f"mean local share, layers {band_text(b.shallow)}; higher = more locked into current step"),
        _score_line("Deep Decay", scores["deep_decay"], scores["deep_decay_reason"],
                    f"mean summary recency, layers {band_text(b.deep)}; higher = summary leans on last steps"),
    ]
    weakest = _weakest_sentence(result, compact=True)
    if weakest:
        lines.append(weakest)
    lines += reading(result)[:2]  # the trace's own warnings are the caller's to show, once (see warnings_once)
    wrapped = [textwrap.fill(line, width=width, subsequent_indent="  ") for line in lines]
    return "\n".join(wrapped)


# -- before / after ------------------------------------------------------------------------------------------
def _change(a: float, b: float) -> str:
    d = 100.0 * (b - a)
    return "unchanged" if abs(d) < 0.05 else f"{d:+.1f} points"


def _share_change(before: StepSaliency, after: StepSaliency, metric: str, band_of, what: str,
                  names: tuple[str, str]) -> str:
    a = _band_value(before, metric, band_of(before))
    b = _band_value(after, metric, band_of(after))
    layers = band_text(band_of(before))
    if a is None or b is None:
        missing = before if a is None else after
        return f"{what} (layers {layers}): n/a ({missing.metric_reasons.get(metric, 'no value in the band')})."
    return f"{what} (layers {layers}): {pct(a)} ({names[0]}) -> {pct(b)} ({names[1]}), {_change(a, b)}."


def _score_change(name: str, a: float | None, b: float | None, reason: str | None, worse: str,
                  better: str, names: tuple[str, str]) -> str:
    if a is None or b is None:
        return f"{name}: n/a ({reason})."
    if abs(b - a) < 0.005:
        verdict = "about the same"
    else:
        verdict = f"lower: {better}" if b < a else f"higher: {worse}"
    return f"{name}: {a:.2f} ({names[0]}) -> {b:.2f} ({names[1]}), {verdict}."


def compare(before: StepSaliency, after: StepSaliency, names: tuple[str, str] = ("before", "after")) -> list[str]:
    """Sentences comparing two results (e.g. without and with StepFlow on the same trace)."""
    out = [
        _share_change(before, after, "question_reach", lambda r: r.bands.shallow, "Shallow question reach", names),
        _share_change(before, after, "summary_recency_share", lambda r: r.bands.deep, "Deep summary recency", names),
    ]
    sb, sa = before.band_scores(), after.band_scores()
    out.append(_score_change("Shallow Lock-in", sb["shallow_lock_in"], sa["shallow_lock_in"],
                             sb["shallow_lock_in_reason"] or sa["shallow_lock_in_reason"],
                             "shallow layers more locked into the current step",
                             "shallow layers less locked into the current step", names))
    out.append(_score_change("Deep Decay", sb["deep_decay"], sa["deep_decay"],
                             sb["deep_decay_reason"] or sa["deep_decay_reason"],
                             "the summary relies more on itself and the last steps",
                             "the summary draws more on the earlier reasoning", names))
    if before.labels != after.labels:
        out.append(f"Note: the two results have different steps ({len(before.steps)} vs {len(after.steps)}), "
                   "so they come from different traces; differences mix the trace and the condition.")
    if before.num_layers != after.num_layers:
        out.append(f"Note: different layer counts ({before.num_layers} vs {after.num_layers}); each result's "
                   "bands are its own.")
    return out


# -- StepFlow: how it was measured, what it did, side by side ---------------------------------------------------
def stepflow_of(result: StepSaliency):
    """The StepFlow settings a result was measured with, resolved to its layers (None: measured without)."""
    cfg = (result.meta or {}).get("stepflow")
    if not cfg or cfg.get("kind", "stepflow") != "stepflow":  # a plug-in intervention has no StepFlow bands
        return None
    from ..stepflow.config import StepFlowConfig

    try:
        return StepFlowConfig.from_dict(cfg).resolve(result.num_layers)
    except (TypeError, ValueError, StepscopeError):  # settings written by another version: shown as stored
        return None


def stepflow_settings(result: StepSaliency) -> str | None:
    """E.g. ``OEB on layers 0-7 (tau_max=0.15); SMI on layers 22-29 (alpha=0.06, whole previous step)``."""
    resolved = stepflow_of(result)
    if resolved is None:
        cfg = (result.meta or {}).get("stepflow")
        if cfg and cfg.get("kind", "stepflow") != "stepflow":  # a plug-in intervention describes itself
            from ..stepflow.intervention import describe_dict

            return describe_dict(cfg)
        return None if not cfg else f"StepFlow settings {cfg}"
    return resolved.describe().split(": ", 1)[1]


def trace_origin(trace) -> str:
    """How the trace came about, as far as its metadata tells: generated here with or without StepFlow, or not."""
    meta = getattr(trace, "meta", None) or {}
    if meta.get("stepflow"):
        return "generated with StepFlow on"
    if "stop" in meta and "new_tokens" in meta:
        return "generated without StepFlow"
    return "not generated by stepscope (how it was generated is not recorded)"


def measurement(trace, result: StepSaliency) -> str:
    """One paragraph saying how a with-StepFlow result on a trace was measured."""
    settings = stepflow_settings(result) or "StepFlow's edits"
    return (f"How this was measured: the trace was {trace_origin(trace)}; Step-Saliency was measured "
            f"teacher-forced on that same trace twice, without and with StepFlow's edits ({settings}). The tokens "
            "are the same in both, so the change is what the edits do to the flow, not what StepFlow would have "
            "written (--generate-with-stepflow shows that).")


def _count(n: float) -> str:
    return f"{round(n):,}"


def _layers_text(layers) -> str:
    xs = sorted(layers)
    runs, start = [], None
    for k, x in enumerate(xs):
        start = x if start is None else start
        if k + 1 == len(xs) or xs[k + 1] != x + 1:
            runs.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ("layer " if len(xs) == 1 else "layers ") + ",".join(runs)


def activity_lines(stats: dict | None, resolved=None) -> list[str]:
    """What StepFlow did, from its statistics (``trace.meta["stepflow"]`` or a teacher-forced pass): OEB edits per
    layer and the bridge mass before and after, SMI injections and their mean norm."""
    if not stats:
        return ["no StepFlow statistics recorded"]
    out = []
    per_layer = {int(k): int(v) for k, v in (stats.get("oeb_edits_per_layer") or {}).items()}
    if per_layer:
        edits = sum(per_layer.values())
        rate = stats.get("oeb_edit_rate")
        share = f" ({pct(rate)} of the head-queries it could edit)" if rate is not None else ""
        layers = ", ".join(f"{k}: {_count(v)}" for k, v in sorted(per_layer.items()))
        before, after = stats.get("bridge_mass_before"), stats.get("bridge_mass_after")
        mass = (f"; bridge mass (attention on the question, or on the thinking from summary tokens, averaged over "
                f"those head-queries) {pct(before)} before -> {pct(after)} after"
                if before is not None and after is not None else "")
        out.append(f"OEB edited {_count(edits)} head-queries{share}, per layer {layers}{mass}.")
    elif resolved is None or resolved.oeb_layers:
        out.append("OEB: no edits recorded.")
    n_inj = int(stats.get("smi_injections") or 0)
    if resolved is not None and not resolved.smi_layers:
        pass
    elif n_inj:
        where = f", each in {_layers_text(resolved.smi_layers)}" if resolved is not None else ""
        norm = stats.get("smi_mean_norm")
        out.append(f"SMI injected at {n_inj} step start{'s' if n_inj != 1 else ''}{where}"
                   + (f"; mean norm of the added alpha*m (all heads of a layer) {norm:.3g}" if norm is not None
                      else "") + ".")
    else:
        out.append("SMI injected nothing (no thinking step ended before the summary).")
    return out


@dataclass(frozen=True)
class ScoreRow:
    """One row of the side-by-side table: a band score or a band-mean share in two conditions."""

    name: str
    layers: str
    before: float | None
    after: float | None
    share: bool  # shown as a percentage, its change in points
    reason: str | None
    what: str

    @property
    def change(self) -> float | None:
        return None if self.before is None or self.after is None else self.after - self.before

    def cells(self) -> tuple[str, str, str]:
        """(before, after, change) as text."""
        def value(x):
            return "n/a" if x is None else pct(x) if self.share else f"{x:.3f}"

        d = self.change
        if d is None:
            change = f"n/a ({self.reason or 'not available'})"
        elif self.share:
            change = "0.0 pts" if abs(100 * d) < 0.05 else f"{100 * d:+.1f} pts"
        else:
            change = "0.000" if abs(d) < 0.0005 else f"{d:+.3f}"
        return value(self.before), value(self.after), change


def score_rows(before: StepSaliency, after: StepSaliency) -> list[ScoreRow]:
    """The band scores and the band shares they are read with, for a side-by-side table."""
    sb, sa = before.band_scores(), after.band_scores()
    shallow, deep = band_text(before.bands.shallow), band_text(before.bands.deep)

    def share(metric, band_of):
        a = _band_value(before, metric, band_of(before))
        b = _band_value(after, metric, band_of(after))
        missing = before if a is None else after
        return a, b, missing.metric_reasons.get(metric, "no value in the band")

    reach = share("question_reach", lambda r: r.bands.shallow)
    thinking = share("summary_thinking_share", lambda r: r.bands.deep)
    return [
        ScoreRow("Shallow Lock-in", shallow, sb["shallow_lock_in"], sa["shallow_lock_in"], False,
                 sb["shallow_lock_in_reason"] or sa["shallow_lock_in_reason"],
                 "higher = more locked into the current step"),
        ScoreRow("Deep Decay", deep, sb["deep_decay"], sa["deep_decay"], False,
                 sb["deep_decay_reason"] or sa["deep_decay_reason"],
                 "higher = summary leans on its last steps"),
        ScoreRow("question reach", shallow, reach[0], reach[1], True, reach[2],
                 "thinking step <- question; higher = better bridged"),
        ScoreRow("summary <- thinking", deep, thinking[0], thinking[1], True, thinking[2],
                 "higher = summary draws on the reasoning"),
    ]


def side_by_side(before: StepSaliency, after: StepSaliency, names: tuple[str, str] = ("baseline", "StepFlow"),
                 width: int = WIDTH) -> str:
    """The rows of :func:`score_rows` as a plain-text table: one column per condition and the change."""
    rows = score_rows(before, after)
    labels = [f"{r.name} ({'layer' if '-' not in r.layers else 'layers'} {r.layers})" for r in rows]
    cells = [r.cells() for r in rows]
    w0 = max(len(x) for x in labels)
    w1 = max(len(names[0]), *(len(c[0]) for c in cells))
    w2 = max(len(names[1]), *(len(c[1]) for c in cells))
    w3 = max(len("change"), *(len(c[2]) for c in cells))
    lines = [f"{'':<{w0}}  {names[0]:>{w1}}  {names[1]:>{w2}}  {'change':>{w3}}"]
    for label, (a, b, d) in zip(labels, cells):
        lines.append(f"{label:<{w0}}  {a:>{w1}}  {b:>{w2}}  {d:>{w3}}")
    legend = ("Higher Lock-in: shallow layers more locked into the current step; higher Decay: the summary leans "
              "more on its last steps; question reach: share of a thinking step's saliency from the question; "
              "summary <- thinking: the summary's share from the reasoning.")
    return "\n".join(lines + [textwrap.fill(legend, width=width, subsequent_indent="  ")])


def comparison_summary(before: StepSaliency, after: StepSaliency, trace=None,
                       names: tuple[str, str] = ("baseline", "StepFlow"), width: int = WIDTH) -> str:
    """The terminal block for two conditions on one trace: a shared header, how it was measured, one side-by-side
    table, what StepFlow did (when its statistics are in ``after.meta["stepflow_activity"]``) and the cells that
    moved most."""
    meta_a, meta_b = before.meta or {}, after.meta or {}
    model = meta_a.get("model") or getattr(trace, "model", None) or "model ?"
    head = [str(model), f"{before.num_layers} layers"]
    if meta_a.get("tokens"):
        head.append(f"{meta_a['tokens']} tokens")
    if isinstance(meta_a.get("loss"), (int, float)) and isinstance(meta_b.get("loss"), (int, float)):
        head.append(f"loss {meta_a['loss']:.3f} ({names[0]}), {meta_b['loss']:.3f} ({names[1]})")
    lines = ["Step-Saliency: " + " | ".join(head), f"Steps: {_step_counts(before)} ({_compact_labels(before)})",
             f"Bands: {band_definition(before)}"]
    if stepflow_of(after) is not None or meta_b.get("stepflow"):
        lines.append(measurement(trace, after))
    out = [textwrap.fill(line, width=width, subsequent_indent="  ") for line in lines]
    out += ["", side_by_side(before, after, names, width), ""]
    activity = meta_b.get("stepflow_activity")
    if activity is not None:
        resolved = stepflow_of(after)
        for i, line in enumerate(activity_lines(activity, resolved)):
            prefix = f"{names[1]}'s edits on this trace: " if i == 0 else ""
            out.append(textwrap.fill(prefix + line, width=width, subsequent_indent="  "))
    try:
        shifts = largest_shifts_text(before, after, names)
    except ValueError:  # different steps: no cell-by-cell difference
        shifts = None
    if shifts:
        out.append(textwrap.fill(shifts, width=width, subsequent_indent="  "))
    return "\n".join(out)


def largest_shifts_text(before: StepSaliency, after: StepSaliency, names: tuple[str, str] = ("before", "after"),
                        n: int = 3) -> str | None:
    """E.g. ``Largest shifts (StepFlow - baseline, share of a step's incoming saliency): layer 2 T5<-Q +6.1 pts``."""
    from .diffmap import largest_shifts

    shifts = [s for s in largest_shifts(before, after, n) if abs(s[3]) >= 0.0005]
    if not shifts:
        return f"{names[1]} and {names[0]} give the same shares to within 0.05 points in every cell."
    cells = "; ".join(f"layer {layer} {q}<-{k} {100 * v:+.1f} pts" for layer, q, k, v in shifts)
    return f"Largest shifts ({names[1]} - {names[0]}, share of a step's incoming saliency): {cells}."


def first_difference(a, b) -> int | None:
    """The first response token where two traces of the same prompt differ (None: identical responses)."""
    ra, rb = list(a.response_ids), list(b.response_ids)
    for k, (x, y) in enumerate(zip(ra, rb)):
        if x != y:
            return k
    return None if len(ra) == len(rb) else min(len(ra), len(rb))


def divergence(baseline, other, name: str = "StepFlow") -> str:
    """A sentence on where a trace generated with StepFlow departs from the baseline trace."""
    if list(baseline.token_ids[: baseline.prompt_len]) != list(other.token_ids[: other.prompt_len]):
        return f"The {name} trace has another prompt than the baseline trace; they are not comparable token by token."
    k = first_difference(baseline, other)
    n0, n1 = len(baseline.response_ids), len(other.response_ids)
    if k is None:
        return f"The {name} trace is token for token the baseline trace ({n0} response tokens)."
    return (f"The {name} trace follows the baseline for its first {k} response tokens, then departs "
            f"({n0} response tokens in the baseline, {n1} with {name}).")
