"""How well the live flow monitor tracks Step-Saliency's question reach.

The monitor (``trace.meta["flow"]``, gradient-free, recorded while decoding with StepFlow) gives per thinking step
the mean bridge (question) attention mass in the OEB band, before and after the edit, and in the SMI band.
Step-Saliency (attention x gradient) gives per thinking step the share of its incoming saliency that comes from
the question, averaged over the shallow band (``question_share_per_step``), computed on the same tokens with the
same StepFlow edits on (teacher-forced; the full pass equals decoding). This script reports Spearman's rank
correlation between the two: within each trace across its steps (traces with at least ``--min-steps`` steps),
against the same for the step position alone, within traces once each trace's linear trend over its steps is
removed, and pooled over every step of every trace, each with a problem-clustered bootstrap interval.

    python scripts/monitor_correlation.py --model default --task addsub --n 24 --out docs/data/monitor_addsub.json
    python scripts/monitor_correlation.py --model organism --task organism:medium --n 24 \\
        --out docs/data/monitor_organism.json   # needs `stepscope organism build` first
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

TASKS = {  # the addsub set of scripts/validate_calibration.py, and a longer variant that takes more steps
    "addsub": ("rg:basic_arithmetic", {"min_terms": 2, "max_terms": 2, "max_digits": 1, "operators": ("+", "-"),
                                       "allow_parentheses": False, "allow_negation": False}),
    "addsub-long": ("rg:basic_arithmetic", {"min_terms": 4, "max_terms": 5, "max_digits": 2,
                                            "operators": ("+", "-"), "allow_parentheses": False,
                                            "allow_negation": False}),
}
PROXIES = ("oeb_before", "oeb_after", "smi_before")


def load(task: str, seed: int, size: int):
    from stepscope.evaluation.datasets import load_problems

    if task in TASKS:
        name, params = TASKS[task]
        return load_problems(name, rg_params=params, seed=seed, size=size, limit=size)
    return load_problems(task, seed=seed, size=size, limit=size)


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def partial_spearman(x, y, covariates) -> float:
    """Spearman's rho of ``x`` and ``y`` net of ``covariates`` (ranks regressed out by least squares)."""
    from scipy.stats import rankdata

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    Z = np.column_stack([np.ones(len(x))] + [rankdata(c) for c in covariates])

    def resid(v):
        r = rankdata(v)
        return r - Z @ np.linalg.lstsq(Z, r, rcond=None)[0]

    rx, ry = resid(x), resid(y)
    den = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def detrended(rows: list[dict], proxy: str, min_steps: int) -> float:
    """Spearman's rho, pooled over steps, of proxy and reach after removing each trace's own linear trend in the
    step index: whether the monitor follows reach beyond both falling along a trace (which a plain within-trace
    rank correlation cannot tell from position)."""
    by: dict = {}
    for r in rows:
        by.setdefault(r["problem"], []).append(r)
    xs: list[float] = []
    ys: list[float] = []
    for v in by.values():
        if len(v) < max(min_steps, 3):
            continue
        step = np.array([r["step"] for r in v], float)
        A = np.column_stack([np.ones_like(step), step])
        for key, out in ((proxy, xs), ("reach", ys)):
            y = np.array([r[key] for r in v], float)
            out.extend((y - A @ np.linalg.lstsq(A, y, rcond=None)[0]).tolist())
    return spearman(xs, ys)


def clustered(rows: list[dict], stat, n_boot: int, seed: int) -> tuple[float, list[float]]:
    """``stat(rows)`` and its 95% interval resampling problems (clusters) with replacement."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["problem"], []).append(r)
    keys = list(groups)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(keys), len(keys))
        v = stat([r for i in pick for r in groups[keys[i]]])
        if np.isfinite(v):
            boots.append(v)
    lo, hi = (np.percentile(boots, [2.5, 97.5]).tolist() if boots else [float("nan")] * 2)
    return stat(rows), [float(lo), float(hi)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="default, organism, or a model id / directory")
    ap.add_argument("--task", default=None, help="addsub (default for --model default), organism:medium (default "
                    "for --model organism), or any stepscope dataset name")
    ap.add_argument("--n", type=int, default=24, help="problems (one greedy trace each)")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--min-steps", type=int, default=3, help="steps a trace needs for a within-trace correlation")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    task = args.task or ("organism:medium" if args.model == "organism" else "addsub")

    import torch

    torch.set_num_threads(args.threads)
    import stepscope
    from stepscope.evaluation.datasets import build_user_message
    from stepscope.profiles import get_profile
    from stepscope.saliency.describe import question_share_per_step
    from stepscope.stepflow import StepFlowConfig
    from stepscope.stepflow.monitor import FlowRecord

    start = time.time()
    model, tok = stepscope.load_model(args.model)
    profile = get_profile(None, tok)
    problems = load(task, args.seed, args.n)
    cfg = StepFlowConfig()  # the paper's defaults: the monitor's bands
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traces = stepscope.generate(model, tok, [build_user_message(p, profile) for p in problems],
                                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, stepflow=cfg,
                                    progress=False)
    t_gen = time.time() - start
    rows: list[dict] = []
    for i, t in enumerate(traces):
        rec = FlowRecord.of(t)
        if rec is None or not rec.steps or len(t.steps) < 2:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sal = stepscope.step_saliency(model, tok, t, stepflow=cfg, progress=False)
        reach = question_share_per_step(sal, sal.bands.shallow)
        for s in rec.steps:
            if s.label in reach and s.oeb_before is not None:
                rows.append({"problem": i, "step": s.index, "tokens": s.tokens, "start": s.start,
                             "reach": reach[s.label],
                             **{k: getattr(s, k) for k in PROXIES}})
    t_all = time.time() - start

    def within(proxy, value=None):
        """Mean within-trace rho of ``value(row)`` (default: the row's ``proxy``) with reach."""
        get = value or (lambda r: r[proxy])

        def stat(rs):
            by: dict = {}
            for r in rs:
                by.setdefault(r["problem"], []).append(r)
            rhos = [spearman([get(r) for r in v], [r["reach"] for r in v]) for v in by.values()
                    if len(v) >= args.min_steps]
            rhos = [x for x in rhos if np.isfinite(x)]
            return float(np.mean(rhos)) if rhos else float("nan")
        return stat

    def pooled(proxy):
        return lambda rs: spearman([r[proxy] for r in rs], [r["reach"] for r in rs])

    def pooled_net(proxy):  # net of the step's length and position: both shares fall as a trace grows
        return lambda rs: partial_spearman([r[proxy] for r in rs], [r["reach"] for r in rs],
                                           [[r["tokens"] for r in rs], [r["start"] for r in rs]])

    result = {"model": args.model, "task": task, "n": args.n, "seed": args.seed,
              "max_new_tokens": args.max_new_tokens, "stepflow": cfg.to_dict(),
              "shallow_band": "bottom quarter of layers (Step-Saliency's shallow band = the default OEB band)",
              "traces": len({r["problem"] for r in rows}), "steps": len(rows),
              "traces_with_min_steps": sum(1 for k in {r["problem"] for r in rows}
                                           if sum(r["problem"] == k for r in rows) >= args.min_steps),
              "min_steps": args.min_steps, "proxies": {}, "seconds": {"generate": round(t_gen, 1),
                                                                        "total": round(t_all, 1)}}
    # the position-only reference: how well "earlier step" alone ranks the steps of a trace by reach
    pos, posci = clustered(rows, within("position", lambda r: -r["step"]), args.n_boot, 3)
    result["position_only_within_trace_mean_rho"], result["position_only_ci"] = pos, posci
    print(f"  position only (earlier step = higher reach): within-trace mean rho {pos:+.3f} "
          f"[{posci[0]:+.3f}, {posci[1]:+.3f}]", flush=True)
    for proxy in PROXIES:
        w, wci = clustered(rows, within(proxy), args.n_boot, 0)
        dt, dtci = clustered(rows, lambda rs, p=proxy: detrended(rs, p, args.min_steps), args.n_boot, 4)
        pl, pci = clustered(rows, pooled(proxy), args.n_boot, 1)
        pn, pnci = clustered(rows, pooled_net(proxy), args.n_boot, 2)
        by: dict = {}
        for r in rows:
            by.setdefault(r["problem"], []).append(r)
        rhos = [spearman([r[proxy] for r in v], [r["reach"] for r in v]) for v in by.values()
                if len(v) >= args.min_steps]
        rhos = [x for x in rhos if np.isfinite(x)]
        result["proxies"][proxy] = {
            "within_trace_mean_rho": w, "within_trace_ci": wci, "within_trace_n": len(rhos),
            "within_trace_positive": sum(x > 0 for x in rhos),
            "pooled_rho": pl, "pooled_ci": pci,
            "pooled_rho_net_of_length_and_position": pn, "pooled_net_ci": pnci,
            "within_trace_detrended_rho": dt, "within_trace_detrended_ci": dtci,
        }
        print(f"{proxy:>10}: within-trace mean rho {w:+.3f} [{wci[0]:+.3f}, {wci[1]:+.3f}] over {len(rhos)} traces "
              f"({sum(x > 0 for x in rhos)} positive); pooled rho {pl:+.3f} [{pci[0]:+.3f}, {pci[1]:+.3f}] over "
              f"{len(rows)} steps; net of step length and position {pn:+.3f} [{pnci[0]:+.3f}, {pnci[1]:+.3f}]; "
              f"within traces net of each trace's trend over its steps {dt:+.3f} [{dtci[0]:+.3f}, {dtci[1]:+.3f}]",
              flush=True)
    result["rows"] = rows
    print(f"{result['traces']} traces, {len(rows)} steps, {t_all:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
