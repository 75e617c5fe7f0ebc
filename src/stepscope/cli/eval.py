"""``stepscope eval``: baseline vs StepFlow on a benchmark, resumable, shardable, with a paired summary."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ..errors import StepscopeError
from .common import add_format_arg, add_generation_args, add_model_args, add_out_arg, sampling_from_args
from .stepflow_args import add_stepflow_args, stepflow_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate baseline and StepFlow on a benchmark (resumable, shardable)",
        description="Sample --n responses per problem in every condition (baseline, StepFlow, ablations) with "
        "shared per-sample seeds, grade them, append one JSON line per sample to OUT/results.jsonl, and write a "
        "paired summary (JSON, Markdown table, plot). Re-running the same command resumes the run.")
    add_model_args(p)
    add_problem_args(p)
    add_generation_args(p, max_new_tokens=512)
    r = p.add_argument_group("run")
    r.add_argument("--n", type=int, default=1, help="samples per problem (default 1)")
    r.add_argument("--compare", action="store_true",
                   help="run baseline and StepFlow (= --conditions baseline,stepflow)")
    r.add_argument("--conditions", default=None,
                   help="comma list of baseline, stepflow, oeb-only, smi-only (StepFlow flags apply to all but "
                   "baseline), or the kind of a registered intervention plug-in (see docs/architecture.md)")
    r.add_argument("--intervention-option", action="append", default=[], metavar="KIND.NAME=VALUE",
                   help="a setting of a plug-in condition (repeatable), e.g. question_boost.beta=2")
    r.add_argument("--shard", default=None, metavar="I/N", help="take problems with index %% N == I "
                   "(automatic under accelerate launch)")
    r.add_argument("--workers", type=int, default=2, help="grading processes (0: grade in this process)")
    r.add_argument("--grading", choices=["stepscope", "lighteval"], default="stepscope", help="math scoring: "
                   "stepscope (default) or lighteval (its Math-Verify scoring, to compare with published numbers)")
    r.add_argument("--save-traces", action=argparse.BooleanOptionalAction, default=True,
                   help="save each sample's trace under OUT/traces/<condition>/ (default: on)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--no-plot", action="store_true", help="skip the summary figure")
    add_format_arg(r)
    r.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples for the intervals")
    add_stepflow_args(p)
    add_out_arg(p, "runs/eval")
    p.set_defaults(func=run)


def add_problem_args(p) -> None:
    """Where problems come from; shared with ``analyze``."""
    d = p.add_argument_group("problems")
    d.add_argument("--dataset", help="gsm8k, math500, aime24, aime25, amc23, gpqa_diamond, humaneval, "
                   "livecodebench, rg:<task> or organism:<easy|medium|hard>")
    d.add_argument("--data-dir", type=Path, default=None, help="offline copies of the sets (or STEPSCOPE_DATA_DIR)")
    d.add_argument("--data-file", type=Path, help="your own JSONL of problems instead of --dataset")
    d.add_argument("--question-field", default=None, help="question field of --data-file lines (default: question)")
    d.add_argument("--question-template", default=None, metavar="TEMPLATE",
                   help='build the question from several fields of --data-file lines, e.g. "{Body} {Question}" '
                   "(instead of --question-field)")
    d.add_argument("--answer-field", default="answer", help="answer field of --data-file lines")
    d.add_argument("--id-field", default=None, help="problem id field of --data-file lines (default: line number)")
    d.add_argument("--grader", default="math", metavar="NAME",
                   help="how --data-file answers are graded: math (default), choice, exact, code, or a plug-in grader")
    d.add_argument("--indices", help="rows to use, e.g. 0-9,17")
    d.add_argument("--limit", type=int, default=None, help="use only the first N problems (after --indices)")
    d.add_argument("--rg", action="append", default=[], metavar="KEY=VALUE",
                   help="a reasoning-gym task parameter (repeatable), e.g. --rg min_terms=3")
    d.add_argument("--rg-size", type=int, default=None, help="how many problems to generate for rg:/organism:")
    d.add_argument("--data-seed", type=int, default=0, help="seed of generated problem sets (rg:, organism:)")


_FROM_ARGS = object()  # build_config's "take it from args" default (None is a real device value)


def condition_names(args) -> list[str]:
    from ..evaluation.conditions import parse_conditions

    if args.compare and args.conditions:
        raise StepscopeError("--compare means --conditions baseline,stepflow; give one of them")
    if args.compare:
        return ["baseline", "stepflow"]
    if args.conditions:
        return parse_conditions(args.conditions)
    return ["stepflow"] if args.stepflow else ["baseline"]


def load_eval_problems(args):
    """The problems and the dataset description recorded in run.json."""
    from ..evaluation.datasets import (
        ORGANISM_PREFIX,
        load_problems,
        load_problems_from_file,
        organism_set_size,
        parse_indices,
        parse_rg_params,
    )

    indices = parse_indices(args.indices) if args.indices else None
    desc = {"limit": args.limit, "indices": indices}
    if args.data_file is not None:
        if args.dataset:
            raise StepscopeError("give --dataset or --data-file, not both")
        template = getattr(args, "question_template", None)
        problems = load_problems_from_file(args.data_file, question_field=args.question_field,
                                           answer_field=args.answer_field, grader=args.grader,
                                           id_field=args.id_field, limit=args.limit, indices=indices,
                                           question_template=template)
        desc.update(name=args.data_file.name, question_field=None if template else args.question_field or "question",
                    answer_field=args.answer_field, id_field=args.id_field, grader=args.grader)
        if template:  # only when given, so run.json of runs made before the flag existed still matches
            desc["question_template"] = template
    elif not args.dataset:
        raise StepscopeError("no problems: pass --dataset NAME (e.g. gsm8k) or --data-file FILE.jsonl")
    else:
        for flag in ("question_field", "question_template"):
            if getattr(args, flag, None) is not None:
                raise StepscopeError(f"--{flag.replace('_', '-')} applies to --data-file only; the fields of "
                                     f"{args.dataset} are built in")
        if args.rg and not args.dataset.startswith("rg:"):
            raise StepscopeError(f"--rg applies to rg:<task> sets only, not {args.dataset}")
        rg = parse_rg_params(args.rg)
        problems = load_problems(args.dataset, data_dir=args.data_dir, limit=args.limit, indices=indices,
                                 rg_params=rg, seed=args.data_seed, size=args.rg_size)
        desc["name"] = args.dataset
        if args.dataset.startswith(ORGANISM_PREFIX):
            desc.update(size=organism_set_size(args.rg_size, args.limit), data_seed=args.data_seed)
        elif args.dataset.startswith("rg:"):
            desc.update(rg_params=rg, size=args.rg_size, data_seed=args.data_seed)
    if not problems:
        raise StepscopeError("the selection holds no problems; check --indices / --limit")
    return problems, desc


def build_config(args, problems, dataset: dict, *, device=_FROM_ARGS, device_map=_FROM_ARGS):
    """The run's config, checked as far as it can be without loading the model (``device`` and ``device_map``:
    where this process will load it, when that is not what the arguments say)."""
    from ..evaluation.conditions import CONDITION_NAMES, build_conditions
    from ..evaluation.graders import GradingConfig
    from ..evaluation.run_config import RunConfig, Sampling, problems_fingerprint
    from ..models import checkpoint_identity, device_kind, dtype_name
    from ..stepflow.intervention import parse_option_flags

    names = condition_names(args)
    needs_stepflow = any(n in CONDITION_NAMES and n != "baseline" for n in names)
    stepflow = stepflow_from_args(args, None, force=needs_stepflow)
    plugin_settings = parse_option_flags(getattr(args, "intervention_option", None) or [])
    sampling = Sampling(n=args.n, max_new_tokens=args.max_new_tokens, seed=args.seed,
                        **sampling_from_args(args).to_dict())
    if sampling.n > 1 and sampling.temperature == 0:
        warnings.warn(f"--n {sampling.n} with --temperature 0 (greedy) gives {sampling.n} identical samples per "
                      "problem; set --temperature (e.g. 0.6) to sample", stacklevel=2)
    device = args.device if device is _FROM_ARGS else device
    device_map = getattr(args, "device_map", None) if device_map is _FROM_ARGS else device_map
    checkpoint = checkpoint_identity(args.model)
    conditions = build_conditions(names, stepflow, plugin_settings)
    if checkpoint.num_layers is not None:  # layer lists out of range fail now, not after minutes of loading
        for c in conditions:
            if c.intervention is not None:
                c.intervention.layers(checkpoint.num_layers)
    return RunConfig(args.model, dataset, problems_fingerprint(problems), len(problems), sampling,
                     conditions, args.profile, not args.no_instruction,
                     dtype=dtype_name(args.dtype, device, device_map, checkpoint),
                     device=device_kind(device, device_map), model_files=checkpoint.fingerprint,
                     grading=GradingConfig(getattr(args, "grading", "stepscope")))


def check_run_args(args) -> None:
    """Argument checks that need no model, so a typo fails before minutes of loading."""
    for flag, least in (("batch_size", 1), ("workers", 0), ("n_boot", 1)):
        value = getattr(args, flag, None)
        if value is not None and value < least:
            raise StepscopeError(f"--{flag.replace('_', '-')} must be at least {least}, got {value}")
    with warnings.catch_warnings():  # only the check here; build_config gives any warning once
        warnings.simplefilter("ignore")
        sampling_from_args(args)  # a bad --top-k, --stop, ... fails before the problems load too


def _placement(args):
    """The shard and device of this process: --shard, or one per process under accelerate launch."""
    from ..evaluation.runner import Shard, distributed_context, parse_shard

    ctx = distributed_context()
    if ctx is None:
        return (parse_shard(args.shard) if args.shard else Shard()), args.device, ctx
    if args.shard:
        raise StepscopeError("--shard is set automatically under accelerate launch; drop it")
    if args.device_map:
        raise StepscopeError("--device-map spreads one model over all GPUs, but under accelerate launch each process "
                             "holds its own copy; launch one process with --device-map instead")
    return ctx.shard, ctx.device or args.device, ctx


def _layers(config, model) -> dict:
    from ..stepflow.config import StepFlowConfig

    layers = model.config.num_hidden_layers
    out = {}
    for c in config.conditions:
        spec = c.intervention
        if isinstance(spec, StepFlowConfig):
            from ..windows import layer_windows

            resolved = spec.resolve(layers, layer_windows(model.config))
            print(f"{c.name}: {resolved.describe()}")
            out[c.name] = {"oeb": sorted(resolved.oeb_layers), "smi": sorted(resolved.smi_layers)}
        elif spec is not None:
            print(f"{c.name}: {spec.describe(layers)}")
            out[c.name] = {"layers": sorted(spec.layers(layers))}
    return out


def run(args) -> int:
    from .. import __version__
    from ..evaluation import runner
    from ..models import load_model

    # Everything that can be refused without the model is refused first: loading can take minutes.
    check_run_args(args)
    problems, dataset = load_eval_problems(args)
    shard, device, ctx = _placement(args)
    device_map = args.device_map
    if ctx is not None and device and device.startswith("cuda"):
        device_map = device  # load straight onto this process's GPU: N processes never hold N copies in RAM
    config = build_config(args, problems, dataset, device=device, device_map=device_map)
    runner.prepare_run_dir(args.out, config)  # refuse a changed config before the model loads
    isolation = _sandbox_isolation(problems)
    with runner.lock_results(args.out, shard) as lock:  # and a second process writing the same file
        model, tok = load_model(args.model, dtype=args.dtype, device=device, device_map=device_map,
                                trust_remote_code=args.trust_remote_code)
        layers = _layers(config, model)
        if ctx is None or ctx.process_index == 0:
            runner.update_run_info(args.out, layers=layers, stepscope_version=__version__,
                                   data_dir=_text(args.data_dir), model_dtype=str(model.dtype).removeprefix("torch."),
                                   **({"sandbox": isolation} if isolation else {}))
        where = f" (shard {shard})" if shard.count > 1 else ""
        print(f"{len(problems)} problems x {config.sampling.n} samples x {len(config.conditions)} conditions "
              f"({', '.join(c.name for c in config.conditions)}){where} -> {args.out}")
        outcome = runner.run_eval(model, tok, problems, config, args.out, shard=shard,
                                  batch_size=args.batch_size, workers=args.workers, save_traces=args.save_traces,
                                  progress=not args.no_progress, lock=lock)
    print(f"wrote {outcome.written} new samples, {outcome.skipped} already done, to {outcome.results_path}")
    return _summarise(args, config.num_problems, shard.count)


def _summarise(args, num_problems: int, shards: int) -> int:
    """Write the summary; a shard writes it only once every shard's samples are in (the last one to finish)."""
    from ..evaluation.summary import load_summary

    try:
        summary = load_summary(args.out, n_boot=args.n_boot)
    except StepscopeError as exc:
        print(f"no summary yet: {exc}")
        return 0
    if summary.problems < num_problems:
        print(f"{num_problems - summary.problems} of {num_problems} problems still miss samples"
              + (" (other shards are still running?)" if shards > 1 else "")
              + f"; run `stepscope report {args.out}` once every shard is done.")
        if shards > 1:
            return 0
    paths = summary.write(args.out, plot=not args.no_plot, formats=args.format)
    print(summary.to_markdown())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _text(path) -> str | None:
    return None if path is None else str(path)


def _sandbox_isolation(problems) -> str | None:
    """For sets graded by running code: the isolation model code gets here, said once and recorded."""
    if not any(p.grader == "code" for p in problems):
        return None
    from ..sandbox import isolation_mode

    isolation = isolation_mode()
    strong = isolation.startswith("bwrap") or "netns" in isolation
    print(f"sandbox for model code: {isolation}" + ("" if strong else
          " (weak: install bubblewrap, or allow user namespaces, for a private file system and network)"),
          file=sys.stderr, flush=True)
    return isolation
