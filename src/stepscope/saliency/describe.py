"""Plain-language reading of a Step-Saliency result, a compact terminal block, and before/after comparison.

Every number in the text comes from the result (its metrics, band scores and sums); a metric the trace cannot
have is named with the reason, never written as 0.
"""

from __future__ import annotations

import textwrap

import numpy as np

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
        label = min(per_step, key=per_step.get)
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
    lines += reading(result)[:2]
    for w in list(getattr(trace, "warnings", []) or [])[:1]:
        lines.append(f"warning: {w}")
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
