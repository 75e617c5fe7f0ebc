"""Calibrated bands vs the paper's default vs random bands of the same size, on fresh problems.

Bands are calibrated on one data seed and every arm is tested on problems of another seed (greedy, the same
problems in every arm), each against plain decoding with the paired bootstrap interval and the exact McNemar p,
and calibrated against default head to head. Writes a JSON file of everything.

    python scripts/validate_calibration.py --model default --task addsub --n 300 --out docs/data/calibration_addsub.json
    python scripts/validate_calibration.py --model organism --task organism:medium --n 300 --max-new-tokens 400 \\
        --batch-size 32 --out docs/data/calibration_organism.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

TASKS = {
    "addsub": ("rg:basic_arithmetic", {"min_terms": 2, "max_terms": 2, "max_digits": 1, "operators": ("+", "-"),
                                       "allow_parentheses": False, "allow_negation": False}),
}


def load(task: str, seed: int, size: int):
    from stepscope.evaluation.datasets import load_problems

    if task in TASKS:
        name, params = TASKS[task]
        return load_problems(name, rg_params=params, seed=seed, size=size, limit=size)
    return load_problems(task, seed=seed, size=size, limit=size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--task", default="addsub")
    ap.add_argument("--calibration-size", type=int, default=16)
    ap.add_argument("--calibration-seed", type=int, default=1)
    ap.add_argument("--test-seed", type=int, default=2)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import stepscope
    from stepscope.calibrate import calibrate
    from stepscope.evaluation.datasets import build_user_message
    from stepscope.evaluation.graders import grade_many
    from stepscope.evaluation.stats import mcnemar_exact, paired_bootstrap_ci
    from stepscope.profiles import get_profile
    from stepscope.stepflow import StepFlowConfig

    start = time.time()
    model, tok = stepscope.load_model(args.model)
    profile = get_profile(None, tok)
    calib = load(args.task, args.calibration_seed, args.calibration_size)
    test = load(args.task, args.test_seed, args.n)
    overlap = {p.question for p in calib} & {p.question for p in test}
    cal = calibrate(model, tok, [build_user_message(p, profile) for p in calib],
                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False)
    n_layers, size = cal.num_layers, cal.band_size
    rng = random.Random(0)
    rand_oeb = rng.randrange(0, n_layers - size + 1)
    rand_smi = rng.randrange(0, n_layers - size + 1)
    arms = {
        "baseline": None,
        "default": StepFlowConfig(),
        "calibrated": cal.to_config(),
        "random": StepFlowConfig(oeb_layers=tuple(range(rand_oeb, rand_oeb + size)),
                                 smi_layers=tuple(range(rand_smi, rand_smi + size))),
    }
    prompts = [build_user_message(p, profile) for p in test]
    scores: dict[str, np.ndarray] = {}
    for name, cfg in arms.items():
        traces = stepscope.generate(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                    batch_size=args.batch_size, stepflow=cfg, progress=False)
        grades = grade_many(test, [t.response for t in traces], workers=1)
        scores[name] = np.array([g.correct for g in grades], dtype=float)
        print(f"{name}: {scores[name].mean():.3f}", flush=True)

    def compare(a: str, b: str) -> dict:
        x, y = scores[a], scores[b]
        ci = paired_bootstrap_ci(x, y)
        test_ = mcnemar_exact(int(((x == 0) & (y == 1)).sum()), int(((x == 1) & (y == 0)).sum()))
        return {"first": a, "second": b, "difference": float((y - x).mean()), "ci": [ci.low, ci.high],
                "p_exact": test_.p_value, "fixed": int(((x == 0) & (y == 1)).sum()),
                "broken": int(((x == 1) & (y == 0)).sum())}

    result = {
        "model": args.model, "task": args.task, "n": args.n, "calibration_size": args.calibration_size,
        "calibration_seed": args.calibration_seed, "test_seed": args.test_seed,
        "overlapping_questions": len(overlap),
        "bands": {name: (None if cfg is None else {"oeb": list(cfg.resolve(n_layers).oeb_layers),
                                                    "smi": list(cfg.resolve(n_layers).smi_layers)})
                  for name, cfg in arms.items()},
        "calibration": cal.to_dict(),
        "accuracy": {name: float(v.mean()) for name, v in scores.items()},
        "comparisons": [compare("baseline", arm) for arm in ("default", "calibrated", "random")]
        + [compare("default", "calibrated")],
        "seconds": round(time.time() - start, 1),
    }
    for name in result["bands"]:
        if result["bands"][name]:
            result["bands"][name] = {k: sorted(v) for k, v in result["bands"][name].items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for c in result["comparisons"]:
        print(f"{c['first']} -> {c['second']}: {c['difference']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] "
              f"exact p={c['p_exact']:.3g} (fixed {c['fixed']}, broken {c['broken']})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
