"""``stepscope generate``: segmented reasoning traces of a model."""

from __future__ import annotations

from .common import (
    add_generation_args,
    add_model_args,
    add_out_arg,
    add_question_args,
    load_model_from_args,
    questions_from_args,
    sampling_from_args,
    with_instruction,
)


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate and segment reasoning traces",
                       description="Generate a response to each question and print it segmented into the "
                       "question, numbered thinking steps and the summary; traces are written as JSON.")
    add_model_args(p)
    add_question_args(p)
    add_generation_args(p)
    from .stepflow_args import add_stepflow_args

    add_stepflow_args(p)
    p.add_argument("--monitor", action="store_true",
                   help="with --stepflow: print one line per thinking step to stderr as the model writes (the "
                   "mean bridge mass in the OEB band before -> after the edit, and in the SMI band)")
    add_out_arg(p, "runs/generate")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..generation import generate
    from .stepflow_args import stepflow_from_args

    questions = questions_from_args(args)
    sampling = sampling_from_args(args)  # a bad value fails before the model loads
    model, tok = load_model_from_args(args)
    prompts = with_instruction(questions, tok, args.profile, args.no_instruction)
    stepflow = stepflow_from_args(args, model)
    if getattr(args, "monitor", False) and stepflow is None:
        from ..errors import StepscopeError

        raise StepscopeError("--monitor reads StepFlow's bridge masses; add --stepflow")
    with _monitor(getattr(args, "monitor", False)):
        traces = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, **sampling.to_dict(),
                          seed=args.seed, batch_size=args.batch_size, profile=args.profile,
                          stepflow=stepflow)
    out = args.out / "traces"
    for i, t in enumerate(traces):
        path = t.save(out / f"trace_{i:04d}.json")
        stop = t.meta["stop"] + (f" {t.meta['stop_string']!r}" if "stop_string" in t.meta else "")
        print(f"== trace {i} ({len(t)} tokens, {t.meta.get('new_tokens')} generated, stop: {stop})"
              f" -> {path}")
        print(t.pretty(show_warnings=False))  # warnings are shown once per run, on stderr
        if "stepflow" in t.meta:
            print(f"   StepFlow: {_stats_line(t.meta['stepflow'])}")
        print()
    return 0


def _monitor(on: bool):
    """``--monitor``: each finished thinking step's flow line on stderr, between progress lines."""
    import contextlib

    if not on:
        return contextlib.nullcontext()
    from ..progress import write
    from ..stepflow.monitor import stream

    return stream(lambda row, step: write(f"flow {step.line(row)}"))


def _stats_line(s: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    edits = sum(s["oeb_edits_per_layer"].values())
    return (f"OEB edited {edits} head-queries ({pct(s['oeb_edit_rate'])} of eligible), bridge mass "
            f"{pct(s['bridge_mass_before'])} -> {pct(s['bridge_mass_after'])}; SMI injected at "
            f"{s['smi_injections']} step starts (mean |alpha*m| {s['smi_mean_norm'] or 0:.3f})")
