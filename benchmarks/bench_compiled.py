"""StepFlow's cost on the decoding path people deploy: eager and compiled (static cache + torch.compile), one run.

    python benchmarks/bench_compiled.py --threads 1                      # default model, batch 1 and 8
    python benchmarks/bench_compiled.py --tokens 64 --batches 1 --repeats 1 --out DIR

Four conditions of ``stepscope.generate`` (greedy, ``ignore_eos``): eager plain, eager StepFlow (dynamic cache, as
before), compiled plain and compiled StepFlow (``compile=True``). Every condition is warmed up first (that is where
compiling happens); then the repeats alternate the conditions so that machine noise hits all of them alike. The
ratios within the run are what to read. Also reported: the graph breaks of one compiled decoding step, plain and
with StepFlow (``torch._dynamo.explain``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

from bench_generation import QUESTIONS, SUFFIX


def explain_step(model, tok, prompts, stepflow) -> dict:
    """Graph count and breaks of one compiled decoding step (prefill eager, as generate does)."""
    from contextlib import nullcontext

    import torch

    from stepscope.batch import left_pad, positions
    from stepscope.generation import _forward_last, cache_kwarg, new_static_cache
    from stepscope.labels import RowLabeler
    from stepscope.profiles import get_profile
    from stepscope.stepflow.handle import session as stepflow_session

    ids, mask = left_pad(prompts, tok.pad_token_id, "cpu")
    width, span = ids.shape[1], ids.shape[1] + 8
    mask = torch.cat([mask, mask.new_ones((len(prompts), span - width))], dim=1)
    pos = positions(mask[:, :width])
    labeler = RowLabeler(tok, get_profile(None, tok), prompts, "cpu", capacity=span)
    fwd = {cache_kwarg(model): new_static_cache(model, span), "use_cache": True, "logits_to_keep": 1}
    session = stepflow_session(model, tok, stepflow, labeler) if stepflow is not None else nullcontext()
    with session, torch.inference_mode():
        nxt = _forward_last(model, ids, mask, pos, fwd).argmax(-1)
        labeler.push(nxt.tolist())
        e = torch._dynamo.explain(_forward_last)(model, nxt[:, None], mask, pos[:, -1:] + 1, fwd)
    torch._dynamo.reset()
    return {"graphs": e.graph_count, "graph_breaks": e.graph_break_count, "ops": e.op_count,
            "break_reasons": sorted({str(b.reason).splitlines()[0][:160] for b in e.break_reasons})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-explain", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="write bench_compiled.json here")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import stepscope
    from stepscope.prompting import prompt_ids

    model, tok = stepscope.load_model("default")
    prompts = [q + SUFFIX for q in QUESTIONS]
    cfg = stepscope.StepFlowConfig()
    report = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "tokens": args.tokens,
              "model": "default (SmolLM2-135M-Instruct, float32)"}
    if not args.skip_explain:
        ids = [prompt_ids(tok, p) for p in prompts[:2]]
        report["explain"] = {"plain": explain_step(model, tok, ids, None),
                             "stepflow": explain_step(model, tok, ids, cfg)}
        print("one decoding step:", json.dumps(report["explain"]), flush=True)

    def run(ps, stepflow, compiled):
        stepscope.generate(model, tok, ps, max_new_tokens=args.tokens, batch_size=len(ps), ignore_eos=True,
                           progress=False, stepflow=stepflow, compile=compiled)

    conditions = {
        "eager": lambda ps: run(ps, None, False),
        "eager+StepFlow": lambda ps: run(ps, cfg, False),
        "compiled": lambda ps: run(ps, None, True),
        "compiled+StepFlow": lambda ps: run(ps, cfg, True),
    }
    for bs in args.batches:
        ps = prompts[:bs]
        for name, fn in conditions.items():  # warm-up: compiles the compiled conditions' decoding step
            t0 = time.perf_counter()
            fn(ps)
            report[f"batch{bs}_{name}_warmup_s"] = round(time.perf_counter() - t0, 1)
        times = {k: [] for k in conditions}
        for _ in range(args.repeats):
            for name, fn in conditions.items():
                t0 = time.perf_counter()
                fn(ps)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {f"batch{bs}_{k}_tok_per_s": round(bs * args.tokens / v, 2) for k, v in med.items()}
        row[f"batch{bs}_eager_stepflow_ratio"] = round(med["eager+StepFlow"] / med["eager"], 3)
        row[f"batch{bs}_compiled_stepflow_ratio"] = round(med["compiled+StepFlow"] / med["compiled"], 3)
        row[f"batch{bs}_compile_speedup"] = round(med["eager"] / med["compiled"], 3)
        row[f"batch{bs}_times_s"] = {k: [round(x, 2) for x in v] for k, v in times.items()}
        report.update(row)
        print(f"batch {bs}: " + ", ".join(f"{k} {bs * args.tokens / v:.1f} tok/s" for k, v in med.items())
              + f" | StepFlow / plain: eager {row[f'batch{bs}_eager_stepflow_ratio']:.3f}, compiled "
              f"{row[f'batch{bs}_compiled_stepflow_ratio']:.3f}", flush=True)
    print(json.dumps(report))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_compiled.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
