"""``stepscope calibrate``: StepFlow layer bands chosen from Step-Saliency on a small set of your problems."""

from __future__ import annotations

from ..errors import StepscopeError
from .common import add_model_args, add_out_arg
from .saliency_args import add_band_fraction_arg


def register(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="choose StepFlow's layer bands from Step-Saliency on a few problems",
        description="Generate baseline traces for a small calibration set, measure Step-Saliency, and choose "
        "the OEB band (layers where thinking reaches the question least, among layers that can see it) and the "
        "SMI band (layers with the strongest Deep Decay). Writes bands.json (with the evidence) and bands.png; "
        "pass it to generate / diagnose / eval / analyze with --bands. Optionally scores a tau_max x alpha grid "
        "on held-out problems with the paired test.")
    add_model_args(p)
    g = p.add_argument_group("problems")
    g.add_argument("--dataset", required=True, help="a benchmark name, rg:<task> or organism:<difficulty>")
    g.add_argument("--data-dir", default=None, help="folder of offline benchmark copies")
    g.add_argument("-n", "--calibration-size", type=int, default=16,
                   help="calibration problems, the first of the set (default 16; 8-32 is the intended range)")
    g.add_argument("--seed", type=int, default=0, help="seed of generated sets (rg:, organism:)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--batch-size", type=int, default=8)
    add_band_fraction_arg(g)
    g = p.add_argument_group("strength grid (optional)")
    g.add_argument("--held-out", type=int, default=0,
                   help="score the grid on this many problems after the calibration set (0: no grid)")
    g.add_argument("--tau-grid", default="", help="tau_max values, e.g. 0.1,0.15,0.25")
    g.add_argument("--alpha-grid", default="", help="alpha values, e.g. 0.03,0.06,0.12")
    g.add_argument("--workers", type=int, default=2, help="grading processes")
    add_out_arg(p, "runs/calibrate")
    p.set_defaults(func=run)


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StepscopeError(f"{flag} takes numbers separated by commas, e.g. 0.1,0.15") from None


def run(args) -> int:
    from ..calibrate import calibrate, score_grid
    from ..evaluation.datasets import build_user_message, load_problems
    from ..profiles import get_profile
    from .common import load_model_from_args

    if args.calibration_size < 1:
        raise StepscopeError("--calibration-size must be at least 1")
    if args.held_out < 0:
        raise StepscopeError("--held-out must be 0 or more")
    taus, alphas = _floats(args.tau_grid, "--tau-grid"), _floats(args.alpha_grid, "--alpha-grid")
    if (taus or alphas) and not args.held_out:
        raise StepscopeError("a strength grid needs held-out problems to score on; add --held-out N")
    total = args.calibration_size + args.held_out
    problems = load_problems(args.dataset, data_dir=args.data_dir, limit=total, seed=args.seed)
    if len(problems) < total:
        raise StepscopeError(f"{args.dataset} has {len(problems)} problems; {total} were asked for")
    calib, held = problems[: args.calibration_size], problems[args.calibration_size:]
    model, tok = load_model_from_args(args)
    profile = get_profile(getattr(args, "profile", None), tok)
    questions = [build_user_message(p, profile) for p in calib]
    result = calibrate(model, tok, questions, max_new_tokens=args.max_new_tokens, band_fraction=args.band_fraction,
                       batch_size=args.batch_size)
    if held:
        result = score_grid(model, tok, held, result, tau_grid=taus, alpha_grid=alphas,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, workers=args.workers)
    paths = result.save(args.out)
    print(result.describe())
    for row in result.grid:
        print(f"  grid tau_max={row['tau_max']:g} alpha={row['alpha']:g}: {row['accuracy']:.3f} vs "
              f"{row['baseline']:.3f} ({row['difference']:+.3f}, 95% CI [{row['ci'][0]:+.3f}, {row['ci'][1]:+.3f}], "
              f"exact p={row['p']:.3g}, Holm {row['p_holm']:.3g})")
    print("wrote " + ", ".join(str(p) for p in paths) + f"; use it with --stepflow --bands {paths[0]}")
    return 0
