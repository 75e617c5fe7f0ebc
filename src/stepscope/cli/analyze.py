"""``stepscope analyze``: do correct and wrong traces differ in Step-Saliency? A thin layer over
:func:`stepscope.analyze` (one or several models)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..errors import StepscopeError
from .common import add_format_arg, add_generation_args, profile_choices
from .eval import add_problem_args, build_config, load_eval_problems
from .saliency_args import add_saliency_args
from .stepflow_args import add_stepflow_args, stepflow_from_args


def register(sub) -> None:
    from ..analysis.defaults import PAIRED_SAMPLES, PAIRED_TEMPERATURE

    p = sub.add_parser(
        "analyze", help="compare Step-Saliency of correct and wrong traces (paired, length-adjusted, with controls)",
        description="Generate and grade traces (an eval run, resumable; by default "
        f"{PAIRED_SAMPLES} samples per problem at temperature {PAIRED_TEMPERATURE}, so that problems have both "
        "outcomes) or reuse those of an earlier run (--traces), measure Step-Saliency of each (cached), and compare "
        "correct vs wrong traces: every band score within problems (sign-flip test) and pooled, each raw and "
        "adjusted for length and step structure, Holm across the scores, the shuffled-step-boundary control, "
        "per-layer curves with bands, the failing step (organism; GSM8K with its offline copy), and with "
        "--mechanism the per-component mechanism check with its random controls. Writes OUT/report.html and "
        "OUT/analysis.json.")
    g = p.add_argument_group("models")
    g.add_argument("--model", action="append", default=None,
                   help="model to analyse (repeatable for a side-by-side comparison; default: default)")
    g.add_argument("--dtype", default=None)
    g.add_argument("--device", default=None)
    g.add_argument("--trust-remote-code", action="store_true")
    g.add_argument("--profile", default="auto", choices=profile_choices())
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    add_problem_args(p)
    add_generation_args(p, max_new_tokens=256)
    p.set_defaults(temperature=PAIRED_TEMPERATURE)
    r = p.add_argument_group("analysis")
    r.add_argument("--n", type=int, default=PAIRED_SAMPLES,
                   help=f"samples per problem when analyze generates (default {PAIRED_SAMPLES}, at --temperature "
                   f"{PAIRED_TEMPERATURE})")
    r.add_argument("--traces", action="append", default=None, metavar="DIR[,DIR]",
                   help="an eval run directory whose saved traces to reuse (one per --model, in order; several "
                   "directories of one model, with disjoint problems, separated by commas)")
    r.add_argument("--condition", default=None, help="which condition of --traces to analyse (default: baseline, "
                   "or stepflow with --stepflow)")
    r.add_argument("--mechanism", action="store_true",
                   help="also measure traces teacher-forced with OEB only, SMI only, both, and their random controls")
    r.add_argument("--mechanism-traces", default="wrong", choices=["wrong", "all"])
    r.add_argument("--mechanism-limit", type=int, default=200, help="at most this many traces in the mechanism check")
    r.add_argument("--no-controls", action="store_true", help="skip the random-edit controls of the mechanism check")
    r.add_argument("--no-activations", action="store_true", help="skip the hidden-state check at SMI's sites")
    r.add_argument("--shuffles", type=int, default=39, help="shuffled step boundaries per trace (control; 0: off)")
    add_saliency_args(r, keep_mb=False)
    r.add_argument("--workers", type=int, default=2, help="grading processes")
    r.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    r.add_argument("--n-perm", type=int, default=4999, help="Monte Carlo permutations (exact enumeration when small)")
    r.add_argument("--analysis-seed", type=int, default=0, help="seed of resampling, shuffles and controls")
    add_stepflow_args(p)
    p.add_argument("--out", type=Path, default=Path("runs/analysis"), help="output directory")
    add_format_arg(p)
    p.set_defaults(func=run)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _run_dir(args, model_name: str, index: int) -> list[Path]:
    """The eval runs holding this model's traces: --traces, or a run analyze makes (and resumes) itself."""
    if args.traces:
        if len(args.traces) != len(args.model):
            raise StepscopeError("give one --traces value per --model, in the same order")
        return [Path(p) for p in args.traces[index].split(",") if p]
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
    s = config.sampling
    print(f"[{model_name}] generating and grading {len(problems)} problems x {s.n} (temperature {s.temperature}) "
          f"-> {out}")
    run_eval(model, tok, problems, config, out, batch_size=args.batch_size, workers=args.workers)
    return [out]


def run(args) -> int:
    from ..analysis.api import AnalysisConfig, AnalysisResult, analyze
    from ..models import load_model
    from ..stepflow import StepFlowConfig

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.model = args.model or ["default"]
    stepflow = stepflow_from_args(args, None)
    decomposed = stepflow or (stepflow_from_args(args, None, force=True) if args.mechanism else StepFlowConfig())
    condition = args.condition or ("stepflow" if stepflow is not None else "baseline")
    config = AnalysisConfig(
        condition=condition, target=args.target, chunk_mb=args.chunk_mb, band_fraction=args.band_fraction,
        n_boot=args.n_boot, n_perm=args.n_perm, shuffles=args.shuffles, seed=args.analysis_seed,
        mechanism=args.mechanism, mechanism_traces=args.mechanism_traces, mechanism_limit=args.mechanism_limit,
        controls=not args.no_controls, activations=not args.no_activations, stepflow=decomposed,
        # traces generated with StepFlow on are measured with it on (what the model actually computed)
        measure_with=stepflow if condition != "baseline" else None)
    results = []
    for i, name in enumerate(args.model):
        run_dirs = _run_dir(args, name, i)
        model, tok = load_model(name, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
        res = analyze(model, tok, run_dirs, config, model_name=name, cache=args.out / "saliency" / _slug(name),
                      limit=args.limit if args.traces else None, data_dir=getattr(args, "data_dir", None))
        results.append(res)
        _print(res.models[0])
    result = AnalysisResult.merge(results)
    path = result.save(args.out)
    from ..progress import phase

    with phase("writing the analysis report and its figures"):  # several seconds with no other sign of life
        report = result.report(args.out, formats=args.format)
    print(f"wrote {path} and {report}")
    return 0


def _print(m) -> None:
    c = m.comparison
    p = c.pairing
    print(f"[{m.model}] {c.n_correct} correct, {c.n_wrong} wrong; {p['problems']} problems, "
          f"{p['problems_with_both_outcomes']} with both outcomes; headline: {c.headline}")
    for s in c.scores:
        print(f"  {s.name:28s} {s.verdict}")
