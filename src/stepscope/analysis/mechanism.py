"""The mechanism check: the same traces teacher-forced without and with each StepFlow component and its control.

Components: OEB only, SMI only, both; controls: OEB lifting a random key group of the bridge's size, SMI injecting a
random vector of the same norm (:mod:`stepscope.stepflow.controls`). On fixed tokens these are deterministic edits,
so a p-value says nothing (any non-zero edit "differs" on every trace); what counts is how large the change is:
the mean change with a problem-clustered 95% interval (it describes how the change varies over traces), the
standardised mean change, the share of traces moved in the mean's direction, and whether the real edit moves a
score further than its control does on the same traces. SMI is also measured where it acts: at the first token of
each new thinking step and over the step it opens (per layer), and in the hidden states and next-token
distributions there (:func:`activation_effects`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..evaluation import stats
from ..stepflow import StepFlowConfig
from ..stepflow.controls import StepFlowControl
from ..trace import Trace
from .measure import SITE_METRICS, Arm, Measured
from .scores import CURVE_METRICS, SCORE_NAMES, layer_values, score_values

# which control each real component is held against
CONTROL_OF = {"oeb": "oeb_random", "smi": "smi_random"}


def components(config: StepFlowConfig, seed: int = 0, controls: bool = True) -> tuple[Arm, ...]:
    """OEB only, SMI only, both (and the two controls) from one StepFlow config."""
    oeb = dataclasses.replace(config, smi=False)
    smi = dataclasses.replace(config, oeb=False)
    out = [Arm("oeb", oeb), Arm("smi", smi), Arm("both", config)]
    if controls:
        out += [Arm("oeb_random", oeb, StepFlowControl("random_bridge", seed)),
                Arm("smi_random", smi, StepFlowControl("random_momentum", seed))]
    return tuple(out)


@dataclass(frozen=True)
class MechanismResult:
    """Per component: the change of every band score, per-layer curve and SMI-site metric against the baseline."""

    n: int
    selection: str
    components: dict
    controls: dict
    activations: dict | None = None

    def to_dict(self) -> dict:
        return {"n": self.n, "selection": self.selection, "components": self.components, "controls": self.controls,
                "activations": self.activations,
                "note": "effect sizes of deterministic edits on fixed tokens; no p-values (they carry no evidence)"}


def change_summary(before: np.ndarray, after: np.ndarray, clusters: np.ndarray, n_boot: int = 2000, seed: int = 0
                   ) -> dict:
    """Effect size of a paired change (after - before) over traces."""
    d = after - before
    out: dict[str, Any] = {"n": int(d.size), "before": float(before.mean()), "after": float(after.mean()),
                           "mean_change": float(d.mean())}
    if d.size >= 2:
        ci = stats.cluster_bootstrap_ci(d, clusters, n_boot=n_boot, seed=seed)
        sd = float(d.std(ddof=1))
        out.update(change_ci=[ci.low, ci.high], sd_change=sd, standardised=float(d.mean() / sd) if sd > 0 else None,
                   share_in_direction=float((np.sign(d) == np.sign(d.mean())).mean()) if d.mean() != 0 else 0.0,
                   max_abs_change=float(np.abs(d).max()))
    return out


def _paired(base: list[np.ndarray | None], edited: list[np.ndarray | None]):
    idx = [i for i, (b, a) in enumerate(zip(base, edited)) if b is not None and a is not None
           and np.all(np.isfinite(b)) and np.all(np.isfinite(a))]
    if not idx:
        return None, None, idx
    return np.stack([b for i in idx if (b := base[i]) is not None]), \
        np.stack([a for i in idx if (a := edited[i]) is not None]), idx


def _curve_change(b: np.ndarray, a: np.ndarray, clusters: np.ndarray, n_boot: int, seed: int) -> dict:
    d = a - b
    band = stats.cluster_bootstrap_band(d, clusters, n_boot=n_boot, seed=seed) if d.shape[0] >= 2 else None
    return {"before": b.mean(0).tolist(), "after": a.mean(0).tolist(), "mean_change": d.mean(0).tolist(),
            "low": None if band is None else band.low.tolist(), "high": None if band is None else band.high.tolist(),
            "n": int(d.shape[0])}


def mechanism_check(baseline: list[Measured], conditions: dict[str, list[Measured]], problem_ids: list[str], *,
                    selection: str = "", n_boot: int = 2000, seed: int = 0,
                    activations: dict | None = None) -> MechanismResult:
    """Compare each condition's measurements with the baseline's on the same traces (same order)."""
    clusters_all = np.array([str(p) for p in problem_ids])
    base_scores = [score_values(m.saliency) for m in baseline]
    comps: dict = {}
    per_trace_change: dict[str, dict[str, np.ndarray]] = {}
    for name, measured in conditions.items():
        entry: dict = {"scores": {}, "curves": {}, "sites": {}, "shuffled_boundaries": {}}
        after_scores = [score_values(m.saliency) for m in measured]
        per_trace_change[name] = {}
        for k, score in enumerate(SCORE_NAMES):
            b = [None if s[score] is None else np.array([s[score]]) for s in base_scores]
            a = [None if s[score] is None else np.array([s[score]]) for s in after_scores]
            bb, aa, idx = _paired(b, a)
            if bb is None:
                entry["scores"][score] = {"n": 0}
                continue
            entry["scores"][score] = change_summary(bb[:, 0], aa[:, 0], clusters_all[idx], n_boot, seed)
            full = np.full(len(baseline), np.nan)
            full[idx] = aa[:, 0] - bb[:, 0]
            per_trace_change[name][score] = full
            # the same change read through shuffled boundaries (the same cut points before and after)
            sb = np.stack([m.shuffled[:, k] for m in baseline])
            sa = np.stack([m.shuffled[:, k] for m in measured])
            ok = np.isfinite(sb).all(1) & np.isfinite(sa).all(1)
            if ok.any():
                entry["shuffled_boundaries"][score] = {"n": int(ok.sum()),
                                                       "mean_change": float((sa[ok] - sb[ok]).mean())}
        for metric in CURVE_METRICS:
            bb, aa, idx = _paired([layer_values(m.saliency, metric) for m in baseline],
                                  [layer_values(m.saliency, metric) for m in measured])
            if bb is not None:
                entry["curves"][metric] = _curve_change(bb, aa, clusters_all[idx], n_boot, seed)
        for metric in SITE_METRICS:
            bb, aa, idx = _paired([m.sites.get(metric) for m in baseline], [m.sites.get(metric) for m in measured])
            if bb is not None:
                entry["sites"][metric] = _curve_change(bb, aa, clusters_all[idx], n_boot, seed)
        comps[name] = entry
    controls = {}
    for real, ctl in CONTROL_OF.items():
        if real not in per_trace_change or ctl not in per_trace_change:
            continue
        rows = {}
        for score in SCORE_NAMES:
            r, c = per_trace_change[real].get(score), per_trace_change[ctl].get(score)
            if r is None or c is None:
                continue
            ok = np.isfinite(r) & np.isfinite(c)
            if ok.sum() < 2:
                continue
            d = r[ok] - c[ok]
            ci = stats.cluster_bootstrap_ci(d, clusters_all[ok], n_boot=n_boot, seed=seed)
            excludes = ci.low > 0 or ci.high < 0
            rows[score] = {"n": int(ok.sum()), "real_change": float(r[ok].mean()),
                           "control_change": float(c[ok].mean()),
                           "difference": float(d.mean()), "difference_ci": [ci.low, ci.high],
                           "exceeds": bool(excludes and abs(r[ok].mean()) > abs(c[ok].mean())
                                           and np.sign(d.mean()) == np.sign(r[ok].mean()))}
        controls[f"{real}_vs_{ctl}"] = rows
    return MechanismResult(len(baseline), selection, comps, controls, activations)


# -- where SMI acts: hidden states and next-token distributions -------------------------------------------------------
def smi_sites(trace: Trace) -> tuple[list[int], list[int]]:
    """Token positions where SMI fires (first token of thinking steps 2..n) and the rest of the steps they open."""
    th = trace.steps_of("thinking")
    boundary = [s.start for s in th[1:]]
    after = [t for s in th[1:] for t in range(s.start + 1, s.end)]
    return boundary, after


def _forward(model, tokenizer, trace: Trace, intervention: Arm | None):
    import contextlib

    import torch

    from ..batch import pad_batch

    batch = pad_batch(model, tokenizer, [trace.token_ids])
    session: contextlib.AbstractContextManager = contextlib.nullcontext()
    if intervention is not None and intervention.spec is not None:
        from ..stepflow.fullpass import teacher_forced

        session = teacher_forced(model, tokenizer, intervention.spec, [trace])
    with session, torch.no_grad():
        out = model(**batch.forward_kwargs(), use_cache=False, output_hidden_states=True)
    hidden = torch.stack(out.hidden_states[1:])[:, 0].double()  # (L, T, d): output of each layer
    return hidden, torch.log_softmax(out.logits[0].double(), -1)


def activation_effects(model, tokenizer, traces: list[Trace], interventions: list[Arm], problem_ids: list[str],
                       *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per layer, the relative change of the hidden state (layer output) at SMI's firing tokens and over the steps
    they open, and the KL divergence of the next-token distribution there, per intervention (same tokens)."""
    per: dict[str, dict[str, list]] = {i.name: {"boundary": [], "after": [], "kl_boundary": [], "kl_after": []}
                                       for i in interventions}
    used = []
    for trace, pid in zip(traces, problem_ids):
        boundary, after = smi_sites(trace)
        if not boundary:
            continue
        used.append(str(pid))
        h0, lp0 = _forward(model, tokenizer, trace, None)
        for iv in interventions:
            h1, lp1 = _forward(model, tokenizer, trace, iv)
            rel = (h1 - h0).norm(dim=-1) / h0.norm(dim=-1).clamp_min(1e-30)  # (L, T)
            kl = (lp0.exp() * (lp0 - lp1)).sum(-1)  # (T,)
            rec = per[iv.name]
            rec["boundary"].append(rel[:, boundary].mean(-1).numpy())
            rec["kl_boundary"].append(float(kl[boundary].mean()))
            if after:
                rec["after"].append(rel[:, after].mean(-1).numpy())
                rec["kl_after"].append(float(kl[after].mean()))
    if not used:
        return {"n": 0, "note": "no trace has a second thinking step: SMI never fires"}
    cl = np.array(used)
    out: dict = {"n": len(used), "what": "relative change ||h_edit - h|| / ||h|| of each layer's output, and "
                 "KL(p || p_edit) of the next-token distribution, at SMI's firing tokens and over the steps they open"}
    for name, rec in per.items():
        entry = {}
        for site in ("boundary", "after"):
            if rec[site]:
                m = np.stack(rec[site])
                clusters = cl if len(rec[site]) == len(cl) else np.arange(len(rec[site]))
                b = stats.cluster_bootstrap_band(m, clusters, n_boot=n_boot, seed=seed) if m.shape[0] >= 2 else None
                entry[f"hidden_change_{site}"] = {"mean": m.mean(0).tolist(),
                                                  "low": None if b is None else b.low.tolist(),
                                                  "high": None if b is None else b.high.tolist()}
                kls = np.array(rec[f"kl_{site}"])
                entry[f"kl_{site}"] = {"mean": float(kls.mean()), "max": float(kls.max())}
        out[name] = entry
    return out
