"""``stepscope diagnose`` (the main job) and ``stepscope saliency`` (the computation alone)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from ..errors import StepscopeError
from .common import (
    add_format_arg,
    add_generation_args,
    add_model_args,
    add_out_arg,
    add_question_args,
    load_model_from_args,
    questions_from_args,
    sampling_from_args,
    with_instruction,
)
from .saliency_args import add_saliency_args
from .stepflow_args import add_stepflow_args, stepflow_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "diagnose", help="generate (or read) a trace, compute Step-Saliency, write an HTML report",
        description="Where does the information flow between reasoning steps break? Generates a trace (or reads "
        "one), segments it into steps, computes per-layer Step-Saliency maps, prints the Shallow Lock-in and "
        "Deep Decay scores and writes report.html, PNGs and the result (NPZ + JSON) to --out.")
    _common(p, "runs/diagnose")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report and the figure files")
    p.add_argument("--generate-with-stepflow", action="store_true",
                   help="also generate a second trace with StepFlow on (same prompt, same sampling; implies "
                   "--stepflow) and show it beside the baseline trace; saved as trace_stepflow.json")
    add_format_arg(p)
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
    add_saliency_args(p.add_argument_group("saliency"))
    add_stepflow_args(p)
    add_out_arg(p, out_default)


def _inputs(args):
    """What to diagnose, read and checked before the model loads: trace files, benchmark problems or questions."""
    from ..trace import Trace

    if args.batch_size < 1:
        raise StepscopeError("--batch-size must be at least 1")
    if args.trace and getattr(args, "generate_with_stepflow", False):
        raise StepscopeError("--generate-with-stepflow generates from a question and cannot take --trace; give the "
                             "question (--question, --input, --dataset), or measure the trace with --stepflow alone")
    if args.trace:
        return "traces", [Trace.load(p) for p in args.trace]
    if args.dataset:
        from ..evaluation.datasets import load_problems

        return "problems", load_problems(args.dataset, data_dir=args.data_dir, indices=[args.index])
    return "questions", questions_from_args(args)


def _traces(args, model, tok, inputs, stepflow=None):
    """Traces from --trace files, or generated for --question/--input/--example/--dataset (with StepFlow on when
    ``stepflow`` is given)."""
    from ..generation import generate

    kind, items = inputs
    if kind == "traces":
        return items
    if kind == "problems":
        from ..evaluation.datasets import build_user_message
        from ..profiles import get_profile

        prof = get_profile(args.profile, tok)
        questions = [build_user_message(p, prof) for p in items]
    else:
        questions = with_instruction(items, tok, args.profile, args.no_instruction)
    traces = generate(model, tok, questions, max_new_tokens=args.max_new_tokens,
                      **sampling_from_args(args).to_dict(), seed=args.seed, batch_size=args.batch_size,
                      profile=args.profile,
                      stepflow=stepflow)
    return traces


def _teacher_forced_activity(model, tok, config, trace) -> dict:
    """StepFlow's statistics on one teacher-forced pass over ``trace``: the edits the with-StepFlow saliency
    measured. A pass of its own because the saliency engine runs layers more than once (recomputation), which
    would count each edit several times."""
    import torch

    from ..batch import pad_batch
    from ..stepflow.fullpass import teacher_forced

    batch = pad_batch(model, tok, [trace.token_ids])
    body = getattr(model, "base_model", model)  # the hidden states are enough: no T x vocab logits
    with teacher_forced(model, tok, config, [trace]) as sf, torch.no_grad():
        body(**batch.forward_kwargs(), use_cache=False)
        return sf.row_stats()[0]


def _reissue_warnings(traces) -> None:
    """Warnings stored in trace files, raised once each like those of freshly generated traces (the command line
    shows each text once and counts repeats)."""
    import warnings

    for t in traces:
        for w in t.warnings:
            warnings.warn(w, stacklevel=2)


def _header(trace, what: str) -> str:
    return (f"== {what}: {len(trace)} tokens, {len(trace.steps)} steps ({', '.join(trace.labels[:12])}"
            f"{'...' if len(trace.steps) > 12 else ''})")


def _compute(args):
    """(trace, {condition: StepSaliency}, trace generated with StepFlow or None) per input."""
    from ..saliency import step_saliency
    from ..saliency.describe import activity_lines, divergence

    inputs = _inputs(args)  # a bad trace file or question fails at once, not after the model has loaded
    also_generate = getattr(args, "generate_with_stepflow", False)
    if inputs[0] != "traces":
        sampling_from_args(args)  # a bad sampling value fails before the model loads
    model, tok = load_model_from_args(args)
    stepflow = stepflow_from_args(args, model, force=also_generate)
    traces = _traces(args, model, tok, inputs)
    if inputs[0] == "traces":
        _reissue_warnings(traces)
    generated = _traces(args, model, tok, inputs, stepflow) if also_generate else [None] * len(traces)
    runs = []
    for i, (trace, sf_trace) in enumerate(zip(traces, generated)):
        print(_header(trace, f"trace {i}" + (" (generated without StepFlow)" if also_generate else "")))
        print(trace.pretty(max_chars=160, show_warnings=False))  # warnings are shown once, on stderr
        if sf_trace is not None:
            print()
            print(_header(sf_trace, f"trace {i} generated with StepFlow"))
            print(sf_trace.pretty(max_chars=160, show_warnings=False))
            resolved = stepflow.resolve(model.config.num_hidden_layers)
            for line in [divergence(trace, sf_trace), *activity_lines(sf_trace.meta.get("stepflow"), resolved)]:
                print(textwrap.fill(line, width=100, subsequent_indent="  "))
        kw = {"target": args.target, "chunk_mb": args.chunk_mb, "keep_mb": args.keep_mb,
              "band_fraction": args.band_fraction}
        results = {"baseline": step_saliency(model, tok, trace, **kw)}
        if stepflow is not None:
            r = step_saliency(model, tok, trace, stepflow=stepflow, **kw)
            resolved = stepflow.resolve(r.num_layers)
            r.meta["stepflow_layers"] = {"oeb": sorted(resolved.oeb_layers), "smi": sorted(resolved.smi_layers)}
            r.meta["stepflow_activity"] = _teacher_forced_activity(model, tok, stepflow, trace)
            results["StepFlow"] = r
        runs.append((trace, results, sf_trace))
    return runs


def run_saliency(args) -> int:
    for i, (trace, results, _) in enumerate(_compute(args)):
        out = args.out / f"trace_{i:04d}"
        trace.save(out / "trace.json")
        for name, r in results.items():
            npz, _ = r.save(out / f"saliency_{name.lower()}")
            print(f"   {name}: Shallow Lock-in {_fmt(r.shallow_lock_in)}, Deep Decay {_fmt(r.deep_decay)} -> {npz}")
    return 0


def run_diagnose(args) -> int:
    from ..saliency import describe
    from ..saliency.report import write_report

    runs = _compute(args)
    for i, (trace, results, sf_trace) in enumerate(runs):
        out = args.out if len(runs) == 1 else args.out / f"trace_{i:04d}"
        trace.save(out / "trace.json")
        for name, r in results.items():
            r.save(out / f"saliency_{name.lower()}")
        print()
        if "StepFlow" in results:  # one block and one side-by-side table, not the summary twice
            print(describe.comparison_summary(results["baseline"], results["StepFlow"], trace))
        else:
            print(describe.terminal_summary(results["baseline"], trace))
        summary = {name: r.summary() for name, r in results.items()}
        if "StepFlow" in results:
            meta = results["StepFlow"].meta
            layers = meta["stepflow_layers"]  # the layers used, where the stored settings say null (= default band)
            summary["StepFlow"]["stepflow"] = {
                "settings": {**meta["stepflow"], "oeb_layers": layers["oeb"], "smi_layers": layers["smi"]},
                "activity": meta["stepflow_activity"]}
        if sf_trace is not None:
            path = sf_trace.save(out / "trace_stepflow.json")
            model = "" if args.model == "default" else f" --model {args.model}"
            print(f"\ntrace generated with StepFlow: {path}\n  its own flow: stepscope diagnose{model} --trace "
                  f"{path} --stepflow")
            summary["StepFlow"]["generated_trace"] = {"path": path.name, "stepflow": sf_trace.meta.get("stepflow"),
                                                      "first_difference": describe.first_difference(trace, sf_trace)}
        if not args.no_report:
            report = write_report(results, trace, out, formats=args.format, stepflow_trace=sf_trace)
            print(f"\nreport: {report}")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"

