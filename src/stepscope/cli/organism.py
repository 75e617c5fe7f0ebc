"""``stepscope organism``: build, evaluate and inspect the thinking model organism.

    stepscope organism build [--seed N] [--steps N] [--threads N] [--config FILE] [--out DIR] [--force]
    stepscope organism eval [--model organism|DIR] [--difficulty medium] [-n 200] [--seed N]
    stepscope organism info [--out DIR]
    stepscope organism sample [--difficulty medium] [-n 2] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import StepscopeError


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "organism",
        help="build and evaluate the small thinking model used on CPUs",
        description="A small Llama model trained from scratch on chained word problems; it writes "
        "<think> one sentence per step </think> then the answer. See docs/organism.md.",
    )
    sub = parser.add_subparsers(dest="organism_command", metavar="{build,eval,info,sample}")
    parser.set_defaults(func=lambda args: _no_command(parser))

    p = sub.add_parser("build", help="train the organism (cached; resumes from its last checkpoint)")
    p.add_argument("--seed", type=int, default=None, help="seed of the data and the init (default 0)")
    p.add_argument("--config", default=None,
                   help="JSON file of settings (keys seed, model, train, eval; see docs/organism.md)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the documented budget)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.add_argument("--eval-n", type=int, default=None, help="held-out problems per difficulty (default 200)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="checkpoint and stop after this many minutes of training; run again to continue")
    p.add_argument("--out", default=None, help="organism directory (default: the stepscope cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("eval", help="held-out accuracy and error sites of a built organism")
    p.add_argument("--model", default="organism", help="'organism' or a model directory")
    p.add_argument("--difficulty", action="append", default=None,
                   help="easy, medium or hard (repeat for several; default all)")
    p.add_argument("-n", type=int, default=200, help="problems per difficulty")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation set (organism:<difficulty>)")
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="print the metadata of a built organism")
    p.add_argument("--out", default=None, help="organism directory (default: the stepscope cache)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("sample", help="print generated problems with their gold solutions")
    p.add_argument("--difficulty", default="medium")
    p.add_argument("-n", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)
    return parser


def _no_command(parser: argparse.ArgumentParser) -> int:
    raise StepscopeError("say what to do: stepscope organism build | eval | info | sample (see --help)")


def cmd_build(args) -> int:
    from ..organism.build import BuildConfig, build

    for name in ("steps", "threads", "eval_n"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise StepscopeError(f"--{name.replace('_', '-')} must be at least 1")
    config = _load_config(args.config) if args.config else BuildConfig()
    config = config.with_overrides(seed=args.seed, steps=args.steps, threads=args.threads,
                                          eval_n=args.eval_n)
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise StepscopeError("--max-minutes must be positive")
    result = build(config, out=args.out, force=args.force, progress=not args.quiet, max_minutes=args.max_minutes)
    meta = result.metadata
    state = "already built (cached)" if result.cached else "built"
    print(f"organism {state}: {result.path}")
    print(_accuracy_line(meta.get("accuracy", {})))
    return 0


def _load_config(path: str):
    from pathlib import Path

    from ..organism.build import BuildConfig

    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise StepscopeError(f"cannot read --config {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise StepscopeError(f"--config {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise StepscopeError(f"--config {path} must hold a JSON object")
    return BuildConfig.from_dict(data.get("settings", data))


def cmd_eval(args) -> int:
    from ..models import load_model
    from ..organism.evaluate import evaluate_difficulty
    from ..organism.tasks import DIFFICULTIES

    difficulties = args.difficulty or list(DIFFICULTIES)
    for d in difficulties:
        if d not in DIFFICULTIES:
            raise StepscopeError(f"unknown difficulty {d!r}; choose from {', '.join(DIFFICULTIES)}")
    if args.n < 1:
        raise StepscopeError("-n must be at least 1")
    model, tokenizer = load_model(args.model, device="cpu")
    results = {d: evaluate_difficulty(model, tokenizer, d, f"eval{args.seed}", args.n, args.max_new_tokens)
               for d in difficulties}
    if args.json:
        print(json.dumps({d: r.to_dict() for d, r in results.items()}, indent=1))
        return 0
    for d, r in results.items():
        share = r.long_range_error_share
        print(f"{d:7s} accuracy {r.accuracy:.1%} ({r.correct}/{r.n}); first wrong step on a long-range step: "
              f"{'-' if share is None else f'{share:.0%}'} (long-range steps are {r.long_range_step_share:.0%} "
              f"of steps); hazard local {_pct(r.hazard_local)}, long-range {_pct(r.hazard_long)}")
    return 0


def cmd_info(args) -> int:
    from ..organism.build import organism_root, read_metadata

    meta = read_metadata(organism_root(args.out) / "model")
    if meta is None:
        raise StepscopeError("no organism is built there: run `stepscope organism build`")
    brief = {k: meta[k] for k in ("seed", "fingerprint", "model", "accuracy", "wall_seconds", "threads") if k in meta}
    print(json.dumps(brief, indent=1))
    return 0


def cmd_sample(args) -> int:
    from ..organism.tasks import organism_problems

    for rec in organism_problems(args.difficulty, args.n, args.seed):
        sys.stdout.write(f"# {rec['id']} (long-range steps {rec['meta']['long_range_steps']})\n")
        sys.stdout.write(f"{rec['question']}\n<think>\n{rec['meta']['gold_response']}\n\n")
    return 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _accuracy_line(acc: dict) -> str:
    return "held-out accuracy: " + ", ".join(f"{d} {a:.1%}" for d, a in acc.items())
