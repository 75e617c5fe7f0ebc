"""Default-model load times, greedy generation speed, and the cost of StepFlow, measured in one run.

    python benchmarks/bench_generation.py            # batch 1 and 8, 256 new tokens, 2 alternating repeats
    python benchmarks/bench_generation.py --tokens 64 --repeats 1

Load times run in fresh processes (cold = converting the GGUF into an empty cache). Speeds alternate the
conditions (transformers' generate, stepscope plain, stepscope + StepFlow) so that machine noise hits all of
them alike; the ratios are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

QUESTIONS = [
    "A bakery sells muffins for 3 dollars each. On Monday it sells 14 muffins and on Tuesday twice as many. "
    "How much money does it make?",
    "Tom has 5 boxes with 12 pencils each. He gives away 17 pencils. How many are left?",
    "A train travels 60 km per hour for 3 hours, then 40 km per hour for 2 hours. How far does it go?",
    "Sara reads 15 pages a day. Her book has 240 pages. After 9 days, how many pages are left?",
    "A garden has 4 rows of 9 tomato plants. Each plant gives 6 tomatoes. How many tomatoes in total?",
    "Ben saves 8 dollars a week. After 7 weeks he spends 20 dollars. How much does he have?",
    "A class has 28 students. 3/4 of them like math. How many students like math?",
    "A rope is 50 meters long. It is cut into pieces of 6 meters. How many full pieces are there?",
]
SUFFIX = " Solve the problem step by step, one short sentence per step. End with 'Final answer: <answer>'."


def load_time(cache: str) -> float:
    env = dict(os.environ, STEPSCOPE_CACHE=cache)
    code = "import time, warnings; warnings.simplefilter('ignore'); t=time.perf_counter(); import stepscope; " \
           "stepscope.load_model('default'); print(time.perf_counter()-t)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def hf_generate(model, tok, prompts, tokens):
    import torch

    from stepscope.batch import left_pad
    from stepscope.prompting import prompt_ids

    ids, mask = left_pad([prompt_ids(tok, p) for p in prompts], tok.pad_token_id, "cpu")
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                       pad_token_id=tok.pad_token_id)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    import stepscope

    report = {"torch_threads": torch.get_num_threads()}
    if not args.skip_load:
        with tempfile.TemporaryDirectory() as cache:
            report["load_cold_s"] = load_time(cache)
            report["load_cached_s"] = load_time(cache)
        print(f"default model load: cold {report['load_cold_s']:.1f} s, cached {report['load_cached_s']:.1f} s")

    model, tok = stepscope.load_model("default")
    prompts = [q + SUFFIX for q in QUESTIONS]
    cfg = stepscope.StepFlowConfig()
    conditions = {
        "transformers": lambda ps: hf_generate(model, tok, ps, args.tokens),
        "stepscope": lambda ps: stepscope.generate(model, tok, ps, max_new_tokens=args.tokens, batch_size=len(ps),
                                                   ignore_eos=True, progress=False),
        "stepscope+StepFlow": lambda ps: stepscope.generate(model, tok, ps, max_new_tokens=args.tokens,
                                                            batch_size=len(ps), ignore_eos=True, progress=False,
                                                            stepflow=cfg),
    }
    for bs in args.batches:
        ps = prompts[:bs]
        conditions["stepscope"](ps[:1])  # warm-up
        times = {k: [] for k in conditions}
        for _ in range(args.repeats):
            for name, fn in conditions.items():
                t0 = time.perf_counter()
                fn(ps)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        tps = {k: bs * args.tokens / v for k, v in med.items()}
        row = {f"batch{bs}_{k}_tok_per_s": round(v, 2) for k, v in tps.items()}
        row[f"batch{bs}_stepflow_time_ratio"] = round(med["stepscope+StepFlow"] / med["stepscope"], 3)
        row[f"batch{bs}_stepflow_vs_transformers_ratio"] = round(med["stepscope+StepFlow"] / med["transformers"], 3)
        row[f"batch{bs}_stepscope_vs_transformers_ratio"] = round(med["stepscope"] / med["transformers"], 3)
        report.update(row)
        print(f"batch {bs}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in tps.items())
              + f" | StepFlow time / plain: {row[f'batch{bs}_stepflow_time_ratio']:.3f}"
              + f" | StepFlow / transformers: {row[f'batch{bs}_stepflow_vs_transformers_ratio']:.3f}")

    # the online tracker does O(1) work per token: compare per-token cost on a short and a long response
    from stepscope.profiles import PROFILES
    from stepscope.tracker import StepTracker

    sentence = "We add the two numbers and carry the one, which gives 42 in total. "
    for n_tok in (500, 8000):
        ids = tok(sentence * (n_tok // 15))["input_ids"][:n_tok]
        tr = StepTracker(tok, PROFILES["think"], [1, 2, 3])
        t0 = time.perf_counter()
        for i in ids:
            tr.push(i)
        report[f"tracker_us_per_token_{n_tok}"] = 1e6 * (time.perf_counter() - t0) / len(ids)
    report["tracker_long_over_short"] = report["tracker_us_per_token_8000"] / report["tracker_us_per_token_500"]
    print(f"tracker: {report['tracker_us_per_token_500']:.1f} us/token at 500 tokens, "
          f"{report['tracker_us_per_token_8000']:.1f} us/token at 8000 (ratio {report['tracker_long_over_short']:.2f})")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
