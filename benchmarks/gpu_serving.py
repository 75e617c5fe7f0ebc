"""StepFlow at serving speed on a GPU: static caches, compiled decoding, a 7B shape, Step-Saliency at 32k.

    python benchmarks/gpu_serving.py --out DIR                       # writes DIR/gpu_serving.json as it goes
    python benchmarks/gpu_serving.py --smoke --device cpu --out DIR  # tiny sizes, end to end on the CPU

Random weights (no weights travel to a GPU machine), bfloat16, batch 1, greedy with ``ignore_eos``:

1. identities on the device (tiny models): static-cache tokens equal dynamic-cache tokens with StepFlow on,
   compiled tokens equal eager tokens (plain and StepFlow), and one compiled decoding step has no more graph
   breaks with StepFlow than without;
2. decoding after long prompts (``--prompt-tokens``, default 16k and 32k) for ``--shapes`` (the default model's
   shape, 30 layers / hidden 576 / 9:3 heads; and a Qwen2-7B-sized config, 28 layers / hidden 3584 / 28:4 heads /
   152k vocabulary): ``stepscope.generate`` eager and compiled, each plain and with StepFlow (target: compiled
   StepFlow at most 1.15x compiled plain), and ``transformers``' own ``generate`` with a static cache, compiled;
3. Step-Saliency of a ``--saliency-tokens`` trace (default 32k) on the 7B shape: time and peak memory.

Each condition runs once to warm up (compiling happens there; its time is kept as ``warmup_s``) and is then
timed. Every section is guarded (an out-of-memory error is recorded and the rest goes on), the measurements run
in order of importance (after the quick identity checks: the 7B shape and the longest prompt first) and the JSON is rewritten after each one, so a
run cut short by a time limit keeps what it finished. The full default plan compiles about a dozen graphs; we
estimate (not measured) more than ten minutes on an H200, so under a 10-minute limit split it, e.g.
``--shapes qwen2-7b --saliency-tokens 0`` then ``--shapes default --skip-identities``.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import warnings
from pathlib import Path

import torch
from gpu_check import guarded, long_trace, sentences, timed

import stepscope
from stepscope.testing import tiny_model, tiny_tokenizer

SHAPES = {
    # name: (family, config keywords)
    "default": ("llama", {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                          "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                          "rope_theta": 100000.0, "tie_word_embeddings": True}),
    "qwen2-7b": ("qwen2", {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                           "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                           "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}),
}
SMOKE = {  # the same families, small enough for a CPU
    "default": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen2-7b": {"vocab_size": 640, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                 "num_attention_heads": 4, "num_key_value_heads": 2},
}
CONDITIONS = ("eager", "eager+stepflow", "compiled", "compiled+stepflow", "transformers_compiled")


def build(shape: str, device, dtype, max_positions: int, smoke: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    family, kw = SHAPES[shape]
    kw = {**kw, **SMOKE[shape]} if smoke else dict(kw)
    cls = LlamaConfig if family == "llama" else Qwen2Config
    cfg = cls(**kw, max_position_embeddings=max_positions, attn_implementation="sdpa", pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device, in the target dtype (a 7B model in seconds)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def _free():
    torch._dynamo.reset()  # compiled graphs (and CUDA graphs) hold the model's tensors
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def identities(device, mode: str) -> dict:
    tok = tiny_tokenizer("think")
    model = tiny_model("llama", tok, layers=2, dtype=torch.float32, scale=2.0).to(device)
    qs = ["What is 2 + 2?", "A much longer question about apples, pears and the price of both together?"]
    cfg = stepscope.StepFlowConfig(tau_max=0.6, alpha=1.5)
    kw = {"max_new_tokens": 24, "batch_size": 2, "progress": False}
    dyn = stepscope.generate(model, tok, qs, stepflow=cfg, **kw)
    sta = stepscope.generate(model, tok, qs, stepflow=cfg, cache_implementation="static", **kw)
    comp = stepscope.generate(model, tok, qs, stepflow=cfg, compile=mode, **kw)
    plain = stepscope.generate(model, tok, qs, **kw)
    plain_comp = stepscope.generate(model, tok, qs, compile=mode, **kw)
    out = {
        "static_equals_dynamic_stepflow": [a.token_ids for a in sta] == [a.token_ids for a in dyn],
        "compiled_equals_eager_stepflow": [a.token_ids for a in comp] == [a.token_ids for a in dyn],
        "compiled_equals_eager_plain": [a.token_ids for a in plain_comp] == [a.token_ids for a in plain],
    }
    _free()
    from bench_compiled import explain_step

    from stepscope.prompting import prompt_ids

    ids = [prompt_ids(tok, q) for q in qs]
    cpu_model = model.to("cpu")  # explain traces only; the device does not matter for graph breaks
    out["explain_plain"] = explain_step(cpu_model, tok, ids, None)
    out["explain_stepflow"] = explain_step(cpu_model, tok, ids, stepscope.StepFlowConfig())
    return out


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def generation(shape: str, prompt_tokens: int, new_tokens: int, conditions, args, device) -> dict:
    tok = tiny_tokenizer("think")
    question = sentences(tok, max(8, prompt_tokens - 60))  # the chat template adds a few tokens
    n_prompt = len(tok(question)["input_ids"])
    model = build(shape, device, torch.bfloat16, n_prompt + new_tokens + 512, args.smoke)
    cfg = stepscope.StepFlowConfig()
    out = {"shape": shape, "prompt_tokens": n_prompt, "new_tokens": new_tokens, "dtype": "bfloat16",
           "layers": model.config.num_hidden_layers, "compile_mode": args.compile_mode}

    def ours(stepflow, compiled):
        return lambda: stepscope.generate(model, tok, [question], max_new_tokens=new_tokens, stepflow=stepflow,
                                          ignore_eos=True, progress=False,
                                          compile=args.compile_mode if compiled else False)

    def theirs():
        from transformers import CompileConfig

        from stepscope.batch import left_pad
        from stepscope.prompting import prompt_ids

        ids, mask = left_pad([prompt_ids(tok, question)], tok.pad_token_id, device)
        cc = CompileConfig(mode=args.compile_mode, fullgraph=False)
        cc._compile_all_devices = True  # transformers compiles by itself on GPUs only; the smoke run is on a CPU
        return lambda: model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                                      compile_config=cc, pad_token_id=tok.pad_token_id)

    runs = {"eager": ours(None, False), "eager+stepflow": ours(cfg, False), "compiled": ours(None, True),
            "compiled+stepflow": ours(cfg, True)}
    if "transformers_compiled" in conditions:
        runs["transformers_compiled"] = theirs()
    with torch.inference_mode():
        for name in conditions:
            if name not in runs:
                continue

            def one(name=name):
                _sync()
                t0 = time.perf_counter()
                runs[name]()
                _sync()
                warm = time.perf_counter() - t0
                _, t, gb = timed(runs[name])
                return {"tok_per_s": new_tokens / t, "s": t, "peak_gb": gb, "warmup_s": warm}

            out[name] = guarded(f"{shape} {name} after {n_prompt}", one)
            print(json.dumps({shape: {name: out[name]}}), flush=True)
    tps = {k: v["tok_per_s"] for k, v in out.items() if isinstance(v, dict) and "tok_per_s" in v}
    if "eager" in tps and "eager+stepflow" in tps:
        out["eager_stepflow_time_ratio"] = tps["eager"] / tps["eager+stepflow"]
    if "compiled" in tps and "compiled+stepflow" in tps:
        out["compiled_stepflow_time_ratio"] = tps["compiled"] / tps["compiled+stepflow"]
    if "compiled" in tps and "transformers_compiled" in tps:
        out["ours_over_transformers_tok_per_s"] = tps["compiled"] / tps["transformers_compiled"]
    return out  # the caller frees the model (compiled graphs hold it until reset)


def saliency(shape: str, tokens: int, dtype, args, device) -> dict:
    tok = tiny_tokenizer("think")
    model = build(shape, device, dtype, tokens + 512, args.smoke)
    trace = long_trace(tok, tokens)
    stepscope.step_saliency(model, tok, long_trace(tok, 256), progress=False)  # warm-up
    r, t, gb = timed(lambda: stepscope.step_saliency(model, tok, trace, progress=False))
    out = {"shape": shape, "T": len(trace), "steps": len(trace.steps), "dtype": str(dtype).replace("torch.", ""),
           "s": t, "peak_gb": gb, "layers": int(r.sums.shape[0])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", nargs="*", default=["qwen2-7b", "default"], choices=sorted(SHAPES))
    ap.add_argument("--prompt-tokens", type=int, nargs="*", default=[32768, 16384])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--conditions", nargs="*", default=list(CONDITIONS), choices=CONDITIONS)
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: reduce-overhead on CUDA)")
    ap.add_argument("--saliency-shape", default="qwen2-7b", choices=sorted(SHAPES))
    ap.add_argument("--saliency-tokens", type=int, default=32768, help="0 skips Step-Saliency")
    ap.add_argument("--saliency-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--skip-identities", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny models and lengths: checks that the script runs")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    device = torch.device(args.device)
    if args.compile_mode is None:
        args.compile_mode = "reduce-overhead" if device.type == "cuda" else "default"
    if args.smoke:
        args.prompt_tokens = [min(n, 96) for n in args.prompt_tokens][:1] or [96]
        args.new_tokens = min(args.new_tokens, 8)
        args.saliency_tokens = min(args.saliency_tokens, 256) if args.saliency_tokens else 0
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "smoke": args.smoke, "args": {k: str(v) for k, v in vars(args).items()}}
    import transformers

    report["transformers"] = transformers.__version__
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        (args.out / "gpu_serving.json").write_text(json.dumps(report, indent=1))

    if not args.skip_identities:
        report["identities"] = guarded("identities", lambda: identities(device, args.compile_mode))
        print("identities", json.dumps(report["identities"]), flush=True)
        save()
    report["generation"] = []
    for shape in args.shapes:
        for n in args.prompt_tokens:
            report["generation"].append(guarded(f"generation {shape} {n}", lambda shape=shape, n=n: generation(
                shape, n, args.new_tokens, args.conditions, args, device)))
            _free()
            save()
    if args.saliency_tokens:
        dtype = getattr(torch, args.saliency_dtype)
        report["saliency"] = guarded("saliency", lambda: saliency(args.saliency_shape, args.saliency_tokens,
                                                                   dtype, args, device))
        _free()
        print("saliency", json.dumps(report["saliency"]), flush=True)
        save()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
