"""``stepscope analyze``: do correct and wrong traces differ in Step-Saliency? (one or several models)"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from ..errors import StepscopeError
from .common import add_generation_args
from .eval import add_problem_args, build_config, load_eval_problems
from .stepflow_args import add_stepflow_args, stepflow_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "analyze", help="compare Step-Saliency of correct and wrong traces (per layer, per band, with tests)",
        description="Generate and grade traces (an eval run, resumable) or reuse those of an earlier run "
        "(--traces), compute Step-Saliency for each (cached), and compare correct vs wrong traces: per-layer "
        "curves with bootstrap bands, band scores with Mann-Whitney tests and effect sizes, the paired version "
        "for problems with both outcomes, and group mean maps. Writes OUT/report.html and OUT/analysis.json.")
    g = p.add_argument_group("models")
    g.add_argument("--model", action="append", default=None,
                   help="model to analyse (repeatable for a side-by-side comparison; default: default)")
    g.add_argument("--dtype", default=None)
    g.add_argument("--device", default=None)
    g.add_argument("--trust-remote-code", action="store_true")
    g.add_argument("--profile", default="auto", choices=["auto", "think", "harmony", "plain"])
    add_problem_args(p)
    add_generation_args(p, max_new_tokens=256)
    r = p.add_argument_group("analysis")
    r.add_argument("--n", type=int, default=1, help="samples per problem (use --temperature > 0 with n > 1)")
    r.add_argument("--traces", type=Path, action="append", default=None,
                   help="an eval run directory whose saved traces to reuse (one per --model, in order)")
    r.add_argument("--condition", default=None, help="which condition of --traces to analyse (default: baseline, "
                   "or stepflow with --stepflow)")
    r.add_argument("--mechanism", action="store_true",
                   help="also measure the wrong traces teacher-forced with StepFlow on (paired mechanism check)")
    r.add_argument("--target", default="all", choices=["all", "generated", "summary"])
    r.add_argument("--chunk-mb", type=float, default=256.0)
    r.add_argument("--band-fraction", type=float, default=0.25)
    r.add_argument("--workers", type=int, default=2, help="grading processes")
    r.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    add_stepflow_args(p)
    p.add_argument("--out", type=Path, default=Path("runs/analysis"), help="output directory")
    p.set_defaults(func=run)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _run_dir(args, model_name: str, index: int) -> Path:
    """The eval run holding this model's traces: --traces, or a run analyze makes (and resumes) itself."""
    if args.traces:
        if len(args.traces) != len(args.model):
            raise StepscopeError("give one --traces directory per --model, in the same order")
        return args.traces[index]
    from ..evaluation.runner import prepare_run_dir, run_eval
    from ..models import load_model

    ns = argparse.Namespace(**vars(args))
    ns.model, ns.compare, ns.conditions, ns.shard = model_name, False, None, None
    problems, dataset = load_eval_problems(ns)
    config = build_config(ns, problems, dataset)
    out = args.out / "eval" / _slug(model_name)
    prepare_run_dir(out, config)
    model, tok = load_model(model_name, dtype=args.dtype, device=args.device,
                            trust_remote_code=args.trust_remote_code)
    print(f"[{model_name}] generating and grading {len(problems)} problems x {config.sampling.n} -> {out}")
    run_eval(model, tok, problems, config, out, batch_size=args.batch_size, workers=args.workers)
    return out


def run(args) -> int:
    from ..analysis.collect import analysed, cached_saliency, first_problems, graded_traces
    from ..analysis.compare import compare_groups, mechanism_check
    from ..analysis.report import write_analysis_report
    from ..models import load_model

    args.model = args.model or ["default"]
    stepflow = stepflow_from_args(args, None)
    if args.mechanism and stepflow is None:
        stepflow_mech = stepflow_from_args(args, None, force=True)
    else:
        stepflow_mech = stepflow
    condition = args.condition or ("stepflow" if stepflow is not None else "baseline")
    comparisons, mechanism, out_json = [], {}, {"models": [], "condition": condition}
    for i, name in enumerate(args.model):
        run_dir = _run_dir(args, name, i)
        rows = graded_traces(run_dir, condition)
        if args.traces and args.limit is not None:
            rows = first_problems(rows, args.limit)
        model, tok = load_model(name, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
        opts = dict(target=args.target, chunk_mb=args.chunk_mb, band_fraction=args.band_fraction)
        cache = args.out / "saliency" / _slug(name)
        # traces generated with StepFlow on are measured with it on (what the model actually computed)
        results = cached_saliency(model, tok, name, [t for _, t in rows], cache,
                                  stepflow=stepflow if condition != "baseline" else None,
                                  desc=f"saliency [{name}]", **opts)
        traces = analysed(rows, results, condition)
        n_right = sum(t.correct for t in traces)
        print(f"[{name}] {len(traces)} traces: {n_right} correct, {len(traces) - n_right} wrong")
        cmp = compare_groups(traces, model=name, n_boot=args.n_boot)
        comparisons.append(cmp)
        entry = cmp.to_dict()
        if args.mechanism:
            wrong = [(r, t) for (r, t) in rows if not r["correct"]]
            before = [s for (r, _), s in zip(rows, results) if not r["correct"]]
            after = cached_saliency(model, tok, name, [t for _, t in wrong], cache, stepflow=stepflow_mech,
                                    desc=f"with StepFlow [{name}]", **opts)
            mechanism[name] = mechanism_check(before, after)
            entry["mechanism"] = mechanism[name].to_dict()
        out_json["models"].append(entry)
        _print_scores(cmp)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "analysis.json").write_text(json.dumps(out_json, indent=1))
    report = write_analysis_report(comparisons, args.out, mechanism=mechanism or None,
                                   settings={"condition": condition, "target": args.target})
    print(f"wrote {args.out / 'analysis.json'} and {report}")
    return 0


def _print_scores(cmp) -> None:
    for s in cmp.scores:
        c = "n/a" if s.correct is None else f"{s.correct.estimate:.3f}"
        w = "n/a" if s.wrong is None else f"{s.wrong.estimate:.3f}"
        p = "n/a" if s.test is None else f"{s.test.p_value:.3g}"
        e = "" if s.test is None else f", effect {s.test.rank_biserial:+.2f}"
        print(f"  {s.name:24s} correct {c}  wrong {w}  Mann-Whitney p={p}{e}")
