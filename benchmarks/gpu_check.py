"""Checks on a CUDA GPU, in one run (they need only torch, transformers, tokenizers and numpy).

1. Step-Saliency equals the brute-force reference on tiny random Llama, Qwen2, Qwen3 and GPT-OSS models on the GPU.
2. Batched greedy generation gives each row the tokens it gets alone; StepFlow at zero strength changes nothing.
3. Long traces: Step-Saliency time and peak GPU memory at 2k-32k tokens on a model of the default model's shape
   (30 layers, hidden 576, 9/3 heads, 49k vocabulary) with random weights (no weights travel to a GPU machine),
   against one plain forward+backward of the same model, and the reference where it fits (2k).
4. Generation after a long prompt, plain vs StepFlow, tokens/s.

    python benchmarks/gpu_check.py --out DIR            # writes DIR/gpu_check.json and prints a table
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import stepscope
from stepscope.saliency.reference import reference_sums
from stepscope.testing import tiny_model, tiny_tokenizer

SENTENCE = "We add the two numbers from the question and check the sum once more against the total"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def exactness(device) -> dict:
    tok = tiny_tokenizer("think")
    response = "First we add two and three. Then we double it to get ten. We check it again.</think>So ten.<|im_end|>"
    trace = stepscope.Trace.from_text(tok, "What is (2 + 3) * 2?", response)
    out = {}
    for family in ("llama", "qwen2", "qwen3", "gpt_oss"):
        model = tiny_model(family, tok, layers=3, dtype=torch.float32).to(device)
        r = stepscope.step_saliency(model, tok, trace, progress=False)
        ref, _ = reference_sums(model, trace)
        out[family] = float(np.abs(r.sums - ref).max() / np.abs(ref).max())
    return out


def generation_identities(device) -> dict:
    tok = tiny_tokenizer("think")
    model = tiny_model("qwen2", tok, layers=2, dtype=torch.float32, scale=3.0).to(device)
    prompts = ["What is 2 + 2?", "A much longer question about apples, pears and the price of both together?", "Hi?"]
    batched = stepscope.generate(model, tok, prompts, max_new_tokens=24, batch_size=3, progress=False)
    alone = [stepscope.generate(model, tok, [p], max_new_tokens=24, progress=False)[0] for p in prompts]
    zero = stepscope.StepFlowConfig(tau_max=0.0, alpha=0.0)
    flat = stepscope.generate(model, tok, prompts, max_new_tokens=24, batch_size=3, stepflow=zero, progress=False)
    return {
        "batched_equals_alone": all(a.token_ids == b.token_ids for a, b in zip(batched, alone)),
        "zero_strength_stepflow_equals_plain": all(a.token_ids == b.token_ids for a, b in zip(batched, flat)),
    }


def default_shaped_model(device, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=max_positions,
                      rope_theta=100000.0, tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device).eval()


def sentences(tok, tokens: int) -> str:
    """Numbered copies of SENTENCE, about ``tokens`` tokens of them."""
    parts, n = [], 0
    while n < tokens:
        parts.append(f"{SENTENCE} {len(parts)}.")
        n += len(tok(parts[-1] + " ")["input_ids"])
    return " ".join(parts)


def long_trace(tok, tokens: int) -> stepscope.Trace:
    text = sentences(tok, tokens - 40) + "</think>The total is 42.<|im_end|>"
    return stepscope.Trace.from_text(tok, "Add the numbers.", text)


def timed(fn):
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync()
    t0 = time.perf_counter()
    value = fn()
    _sync()
    return value, time.perf_counter() - t0, (torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


def guarded(what: str, fn):
    """Run one check; an error (out of memory, say) is recorded, and the other checks go on."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a report of everything that ran matters more here
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"{what}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def long_saliency(device, lengths, reference_max: int) -> list[dict]:
    tok = tiny_tokenizer("think")
    model = default_shaped_model(device, max(lengths) + 64)
    rows = []
    for T in lengths:
        row = guarded(f"saliency at T={T}", lambda: _one_length(model, tok, device, T, reference_max))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _one_length(model, tok, device, T, reference_max) -> dict:
    trace = long_trace(tok, T)
    ids = torch.tensor([trace.token_ids], device=device)
    stepscope.step_saliency(model, tok, long_trace(tok, 256), progress=False)  # warm-up
    r, t_eng, m_eng = timed(lambda: stepscope.step_saliency(model, tok, trace, progress=False))

    def floor():
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    row = {"T": len(trace), "steps": len(trace.steps), "engine_s": t_eng, "engine_gb": m_eng}
    fl = guarded(f"floor at T={len(trace)}", lambda: timed(floor))
    if isinstance(fl, tuple):
        row.update(floor_s=fl[1], floor_gb=fl[2], engine_over_floor=t_eng / fl[1])
    else:
        row["floor"] = fl["error"]
    if len(trace) <= reference_max:
        (ref, _), t_ref, m_ref = timed(lambda: reference_sums(model, trace))
        row.update(reference_s=t_ref, reference_gb=m_ref, reference_over_engine=t_ref / t_eng,
                   max_rel_err=float(np.abs(r.sums - ref).max() / np.abs(ref).max()))
    return row


def long_generation(device, prompt_tokens: int, new_tokens: int) -> dict:
    tok = tiny_tokenizer("think")
    question = sentences(tok, prompt_tokens - 60)  # the chat template adds a few tokens
    n_prompt = len(tok(question)["input_ids"])
    model = default_shaped_model(device, n_prompt + new_tokens + 128).to(torch.bfloat16)
    out = {"prompt_tokens": n_prompt, "new_tokens": new_tokens, "dtype": "bfloat16"}
    # plain is measured before and after StepFlow, so that an order effect (clocks, caches) shows
    for name, cfg in (("plain", None), ("stepflow", stepscope.StepFlowConfig()), ("plain_again", None)):
        stepscope.generate(model, tok, [question], max_new_tokens=8, stepflow=cfg, progress=False)  # warm-up
        _, t, m = timed(lambda: stepscope.generate(model, tok, [question], max_new_tokens=new_tokens,
                                                   stepflow=cfg, ignore_eos=True, progress=False))
        out[f"{name}_tok_per_s"] = new_tokens / t
        out[f"{name}_gb"] = m
    plain = (out["plain_tok_per_s"] + out["plain_again_tok_per_s"]) / 2
    out["stepflow_time_ratio"] = plain / out["stepflow_tok_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--lengths", type=int, nargs="*", default=[2048, 8192, 16384, 32768])
    ap.add_argument("--reference-max", type=int, default=2048)
    ap.add_argument("--prompt-tokens", type=int, nargs="*", default=[16384, 32768])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-identities", action="store_true", help="only the long-trace measurements")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    device = torch.device(args.device)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))

    if not args.skip_identities:
        report["exactness_max_rel_err"] = guarded("exactness", lambda: exactness(device))
        print("exactness", report["exactness_max_rel_err"], flush=True)
        report["generation"] = guarded("generation", lambda: generation_identities(device))
        print("generation", report["generation"], flush=True)
        save()
    if args.lengths:
        report["long_saliency"] = guarded("long saliency",
                                          lambda: long_saliency(device, args.lengths, args.reference_max))
        save()
    report["long_generation"] = []
    for n in args.prompt_tokens:
        report["long_generation"].append(guarded(f"generation after {n}", lambda: long_generation(device, n, args.new_tokens)))
        print(json.dumps(report["long_generation"][-1]), flush=True)
        save()


if __name__ == "__main__":
    main()
