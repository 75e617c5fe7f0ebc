"""``stepscope diagnose`` (the main job) and ``stepscope saliency`` (the computation alone)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import (add_generation_args, add_model_args, add_out_arg, add_question_args, load_model_from_args,
                     questions_from_args, with_instruction)
from .stepflow_args import add_stepflow_args, stepflow_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "diagnose", help="generate (or read) a trace, compute Step-Saliency, write an HTML report",
        description="Where does the information flow between reasoning steps break? Generates a trace (or reads "
        "one), segments it into steps, computes per-layer Step-Saliency maps, prints the Shallow Lock-in and "
        "Deep Decay scores and writes report.html, PNGs and the result (NPZ + JSON) to --out.")
    _common(p, "runs/diagnose")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report and PNGs")
    p.set_defaults(func=run_diagnose)
    s = sub.add_parser("saliency", help="compute Step-Saliency maps only (NPZ + JSON)",
                       description="Compute per-layer step-to-step saliency for traces and save them as NPZ + JSON.")
    _common(s, "runs/saliency")
    s.set_defaults(func=run_saliency)


def _common(p, out_default: str) -> None:
    add_model_args(p)
    add_question_args(p)
    p.add_argument("--trace", type=Path, action="append", help="an existing trace JSON (repeatable)")
    p.add_argument("--dataset", help="take the question from a benchmark set (e.g. gsm8k, math500, rg:chain_sum)")
    p.add_argument("--index", type=int, default=0, help="row of --dataset (default 0)")
    p.add_argument("--data-dir", type=Path, default=None, help="offline copies of the sets (or STEPSCOPE_DATA_DIR)")
    add_generation_args(p)
    g = p.add_argument_group("saliency")
    g.add_argument("--target", default="all", choices=["all", "generated", "summary"],
                   help="next-token losses that make up L (default: every target token)")
    g.add_argument("--chunk-mb", type=float, default=256.0, help="memory budget of one chunk of query rows (MB)")
    g.add_argument("--keep-mb", type=float, default=1024.0,
                   help="memory for keeping top layers' graphs instead of recomputing them (0: leanest)")
    g.add_argument("--band-fraction", type=float, default=0.25, help="shallow/deep band size (default: a quarter)")
    add_stepflow_args(p)
    add_out_arg(p, out_default)


def _traces(args, model, tok):
    """Traces from --trace files, or generated for --question/--input/--example/--dataset."""
    from ..generation import generate
    from ..trace import Trace

    if args.trace:
        return [Trace.load(p) for p in args.trace]
    if args.dataset:
        from ..evaluation.datasets import build_user_message, load_problems
        from ..profiles import get_profile

        problems = load_problems(args.dataset, data_dir=args.data_dir, indices=[args.index])
        prof = get_profile(args.profile, tok)
        questions = [build_user_message(p, prof) for p in problems]
    else:
        questions = with_instruction(questions_from_args(args), tok, args.profile, args.no_instruction)
    traces = generate(model, tok, questions, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, seed=args.seed, batch_size=args.batch_size, profile=args.profile)
    return traces


def _compute(args):
    from ..saliency import step_saliency

    model, tok = load_model_from_args(args)
    stepflow = stepflow_from_args(args, model)
    traces = _traces(args, model, tok)
    runs = []
    for i, trace in enumerate(traces):
        print(f"== trace {i}: {len(trace)} tokens, {len(trace.steps)} steps ({', '.join(trace.labels[:12])}"
              f"{'...' if len(trace.steps) > 12 else ''})")
        print(trace.pretty(max_chars=160))
        kw = dict(target=args.target, chunk_mb=args.chunk_mb, keep_mb=args.keep_mb, band_fraction=args.band_fraction)
        results = {"baseline": step_saliency(model, tok, trace, **kw)}
        if stepflow is not None:
            results["StepFlow"] = step_saliency(model, tok, trace, stepflow=stepflow, **kw)
        runs.append((trace, results))
    return runs


def run_saliency(args) -> int:
    for i, (trace, results) in enumerate(_compute(args)):
        out = args.out / f"trace_{i:04d}"
        trace.save(out / "trace.json")
        for name, r in results.items():
            npz, js = r.save(out / f"saliency_{name.lower()}")
            print(f"   {name}: Shallow Lock-in {_fmt(r.shallow_lock_in)}, Deep Decay {_fmt(r.deep_decay)} -> {npz}")
    return 0


def run_diagnose(args) -> int:
    from ..saliency.describe import compare, terminal_summary
    from ..saliency.report import write_report

    runs = _compute(args)
    for i, (trace, results) in enumerate(runs):
        out = args.out if len(runs) == 1 else args.out / f"trace_{i:04d}"
        trace.save(out / "trace.json")
        for name, r in results.items():
            r.save(out / f"saliency_{name.lower()}")
        print()
        for name, r in results.items():
            if len(results) > 1:
                print(f"-- {name}")
            print(terminal_summary(r, trace))
        if len(results) > 1:
            print()
            for line in compare(results["baseline"], results["StepFlow"], names=("baseline", "StepFlow")):
                print(f"  {line}")
        if not args.no_report:
            report = write_report(results, trace, out)
            print(f"\nreport: {report}")
        summary = {name: r.summary() for name, r in results.items()}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"

