"""Step-Saliency cost on the default model: streaming engine vs the brute-force reference, and vs one plain
forward + backward of the model, on the same synthetic traces. Each measurement runs in its own process so that
peak resident memory is its own.

    python benchmarks/bench_saliency.py                 # T = 2048 (all three) and T = 8192 (engine + floor)
    python benchmarks/bench_saliency.py --lengths 2048  # just one size
"""

from __future__ import annotations

import argparse
import json
import warnings

SENTENCES = [
    "We take the number of apples in the first basket and add the apples from the second basket.",
    "Then we multiply that total by the price of one apple to get the cost.",
    "Next we subtract the discount that the shop gives for large orders.",
    "So the remaining amount is what the customer pays at the counter.",
]


def _threads(n: int) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def make_trace(tokens: int, steps: int):
    """A synthetic plain-profile trace of about ``tokens`` tokens with about ``steps`` thinking steps."""
    import stepscope

    warnings.simplefilter("ignore")
    model, tok = stepscope.load_model("default")
    question = "A shop sells apples. How much does a customer pay for two baskets after the discount?"
    per_step = max(1, tokens // max(steps, 1))
    body: list[str] = []
    i = 0
    text = ""
    while True:
        sent = SENTENCES[i % len(SENTENCES)]
        # pad steps to the wanted length with a clause, so that steps hold ~per_step tokens
        words = sent.rstrip(".") + (", checking each quantity carefully" * max(0, per_step // 6 - 3)) + "."
        candidate = " ".join(body + [words]) + "\nFinal answer: 42"
        if body and len(tok(candidate)["input_ids"]) > tokens - 90:  # stay under the target (and the context)
            break
        body.append(words)
        text = candidate
        i += 1
    trace = stepscope.Trace.from_text(tok, question, text)
    return trace


def engine(tokens: int, steps: int, threads: int = 0, chunk_mb: float = 256.0) -> dict:
    import torch

    import stepscope

    _threads(threads)
    torch.manual_seed(0)
    trace = make_trace(tokens, steps)
    model, tok = stepscope.load_model("default")
    import time

    t0 = time.perf_counter()
    r = stepscope.step_saliency(model, tok, trace, chunk_mb=chunk_mb, progress=False)
    return {"T": len(trace), "steps": len(trace.steps), "seconds": time.perf_counter() - t0,
            "sums": r.sums.tolist() if tokens <= 2048 else None}


def reference(tokens: int, steps: int, threads: int = 0) -> dict:
    import time

    import stepscope
    from stepscope.saliency.reference import reference_sums

    _threads(threads)
    trace = make_trace(tokens, steps)
    model, tok = stepscope.load_model("default")
    t0 = time.perf_counter()
    sums, _ = reference_sums(model, trace)
    return {"T": len(trace), "seconds": time.perf_counter() - t0, "sums": sums.tolist()}


def floor(tokens: int, steps: int, threads: int = 0) -> dict:
    """One plain forward + backward (parameter gradients included), SDPA attention."""
    import time

    import torch

    import stepscope

    _threads(threads)
    trace = make_trace(tokens, steps)
    model, tok = stepscope.load_model("default")
    ids = torch.tensor([trace.token_ids])
    t0 = time.perf_counter()
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return {"T": len(trace), "seconds": time.perf_counter() - t0}


def main() -> None:
    import numpy as np

    from _util import run_isolated

    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reference-max", type=int, default=2048, help="largest T the reference is run at")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every measurement (0: torch's choice)")
    ap.add_argument("--floor-max", type=int, default=4096,
                    help="largest T the plain forward + backward is run at (it needs ~2.5 GB per 1k tokens)")
    args = ap.parse_args()
    rows = []
    for T in args.lengths:
        eng = run_isolated("bench_saliency", "engine", T, args.steps, args.threads)
        row = {"T": eng["T"], "steps": eng["steps"], "engine_s": eng["seconds"], "engine_gb": eng["peak_rss_gb"]}
        if T <= args.floor_max:
            flo = run_isolated("bench_saliency", "floor", T, args.steps, args.threads)
            row.update(floor_s=flo["seconds"], floor_gb=flo["peak_rss_gb"],
                       engine_over_floor_time=eng["seconds"] / flo["seconds"])
        if T <= args.reference_max:
            ref = run_isolated("bench_saliency", "reference", T, args.steps, args.threads)
            a, b = np.array(eng["sums"]), np.array(ref["sums"])
            row.update(reference_s=ref["seconds"], reference_gb=ref["peak_rss_gb"],
                       time_ratio_ref_over_engine=ref["seconds"] / eng["seconds"],
                       memory_ratio_ref_over_engine=ref["peak_rss_gb"] / eng["peak_rss_gb"],
                       max_rel_err=float(np.abs(a - b).max() / np.abs(b).max()))
        rows.append(row)
        print(json.dumps(row))
    print("\nT      steps  engine s / GB   floor s / GB   engine/floor   ref s / GB      ref/engine time, memory")
    for r in rows:
        ref = (f"{r['reference_s']:7.1f} / {r['reference_gb']:5.2f}   {r['time_ratio_ref_over_engine']:5.2f}x, "
               f"{r['memory_ratio_ref_over_engine']:5.2f}x  (max rel err {r['max_rel_err']:.1e})"
               if "reference_s" in r else "not run (too large for this machine)")
        floor = (f"{r['floor_s']:6.1f} / {r['floor_gb']:5.2f}  {r['engine_over_floor_time']:10.2f}x"
                 if "floor_s" in r else "   not run (--floor-max)   ")
        print(f"{r['T']:<6} {r['steps']:<6} {r['engine_s']:6.1f} / {r['engine_gb']:5.2f}  {floor}   {ref}")


if __name__ == "__main__":
    main()
