"""Batched generation (left padding, greedy or sampled) that returns segmented :class:`Trace` objects.

The loop is our own so that every row is tracked online token by token (the step tracker's live labels are
what StepFlow acts on) and so that sampling is per row: row ``i`` draws from its own generator seeded with
``seeds[i]``, so a sample does not depend on which other prompts share its batch.
"""

from __future__ import annotations

import inspect
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .errors import StepscopeError
from .labels import RowLabeler
from .profiles import FormatProfile, get_profile
from .prompting import prompt_ids as build_prompt_ids
from .trace import Trace


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise StepscopeError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise StepscopeError("temperature must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise StepscopeError("top_p must be in (0, 1]")


CACHES = ("dynamic", "static")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class DecodingConfig:
    """How the decoding loop runs.

    ``cache``: ``"dynamic"`` (grows by one position per token) or ``"static"`` (preallocated for the whole batch,
    fixed shapes). ``compile``: None (eager) or a ``torch.compile`` mode for the one-token decoding step; it needs
    the static cache. The prefill always runs eagerly.
    """

    cache: str = "dynamic"
    compile: str | None = None

    def __post_init__(self):
        if self.cache not in CACHES:
            raise StepscopeError(f"cache_implementation must be one of {', '.join(CACHES)}, got {self.cache!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise StepscopeError(f"compile must be True, False or one of {', '.join(COMPILE_MODES)}, "
                                 f"got {self.compile!r}")
        if self.compile is not None and self.cache != "static":
            raise StepscopeError("compiled decoding needs cache_implementation='static' (fixed shapes)")

    @classmethod
    def of(cls, cache_implementation: str | None, compile: bool | str, device) -> DecodingConfig:
        mode = None
        if compile is True:  # CUDA graphs on a GPU remove the per-kernel launch cost that bounds small models
            mode = "reduce-overhead" if torch.device(device).type == "cuda" else "default"
        elif compile:
            mode = compile
        return cls(cache_implementation or ("static" if mode else "dynamic"), mode)


def generate(
    model,
    tokenizer,
    prompts: str | list[str],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    seeds: list[int] | None = None,
    batch_size: int = 8,
    profile: str | FormatProfile | None = None,
    stepflow=None,
    system: str | None = None,
    chat: bool | None = None,
    progress: bool = True,
    ignore_eos: bool = False,
    cache_implementation: str | None = None,
    compile: bool | str = False,
) -> list[Trace]:
    """Generate a response to each prompt (a user question) and return one segmented trace per prompt.

    Greedy when ``temperature == 0``; otherwise temperature + nucleus (``top_p``) sampling, with row ``i``
    seeded by ``seeds[i]`` (default ``seed + i``). ``stepflow``: a :class:`stepscope.StepFlowConfig` to generate
    with StepFlow on; each trace's ``meta["stepflow"]`` then holds what it did. ``ignore_eos``: always generate
    ``max_new_tokens`` (for timing). ``cache_implementation``: ``"dynamic"`` (default) or ``"static"`` (a
    preallocated cache; StepFlow labels are sized to it). ``compile``: decode with a ``torch.compile``d step
    (True picks CUDA graphs on a GPU; or give a mode such as ``"default"``); implies the static cache. Tokens
    equal eager decoding's up to the compiler's floating-point reordering.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise StepscopeError("no prompts to generate from")
    if batch_size < 1:
        raise StepscopeError("batch_size must be at least 1")
    sampling = SamplingConfig(max_new_tokens, temperature, top_p)
    decoding = DecodingConfig.of(cache_implementation, compile, next(model.parameters()).device)
    prof = get_profile(profile, tokenizer)
    if seeds is None:
        seeds = [seed + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise StepscopeError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    ids = [build_prompt_ids(tokenizer, p, system=system, chat=chat) for p in prompts]
    context = getattr(model.config, "max_position_embeddings", None)
    for p, q in zip(ids, prompts):
        if context and len(p) >= context:
            raise StepscopeError(
                f"a prompt of {len(p)} tokens does not fit the model's context of {context} tokens; shorten it"
            )

    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))  # similar lengths share a batch
    out: list[Trace | None] = [None] * len(prompts)
    bar = _progress(len(prompts), progress)
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        new_tokens = sampling.max_new_tokens
        longest = max(len(ids[i]) for i in rows)
        if context and longest + new_tokens > context:
            new_tokens = context - longest
            warnings.warn(f"max_new_tokens cut to {new_tokens} to stay within the model's context of {context}")
        batch = _generate_batch(
            model, tokenizer, prof, [ids[i] for i in rows], [seeds[i] for i in rows],
            SamplingConfig(new_tokens, sampling.temperature, sampling.top_p), stepflow, ignore_eos, decoding,
        )
        for i, (resp, labels, note, meta) in zip(rows, batch):
            meta.update(max_new_tokens=new_tokens, temperature=temperature, top_p=top_p, seed=seeds[i])
            out[i] = Trace.from_ids(
                tokenizer, ids[i] + resp, len(ids[i]), question=prompts[i], profile=prof, model=name,
                meta=meta, labels=labels, note=note,
            )
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    return out  # type: ignore[return-value]


def _progress(total: int, enabled: bool):
    if not enabled or total < 2:
        return None
    from .progress import bar  # on stderr; plain periodic lines when stderr is a log

    return bar(total, "generating", "prompt")


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    return ids


def cache_kwarg(model) -> str:
    """Name of the KV-cache argument (``cache`` in transformers 5.x, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def new_static_cache(model, max_cache_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_cache_len)


STATIC_BUCKET = 128  # static caches are sized in steps of this, so that batches of similar length share a compile


def _forward_last(model, ids, mask, pos, fwd):
    """One forward call, the last position's logits: the step that compiled decoding compiles."""
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, **fwd).logits[:, -1, :]


_COMPILED: dict = {}


def compiled_forward(mode: str):
    """``torch.compile`` of :func:`_forward_last` (one per mode; its guards tell models and shapes apart)."""
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(_forward_last, mode=mode, dynamic=False)
    return _COMPILED[mode]


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _generate_batch(model, tokenizer, profile, prompts, seeds, sampling: SamplingConfig, stepflow, ignore_eos=False,
                    decoding: DecodingConfig = DecodingConfig()):
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = set() if ignore_eos else eos_ids(model, tokenizer)
    B = len(prompts)
    input_ids, mask = left_pad(prompts, pad_id, device)
    pos = positions(mask)
    width = input_ids.shape[1]
    static = decoding.cache == "static"
    span = width + sampling.max_new_tokens
    if static:
        span = -(-span // STATIC_BUCKET) * STATIC_BUCKET
        # one fixed-width mask for every call (slots past the current length are masked as the future)
        mask = torch.cat([mask, mask.new_ones((B, span - width))], dim=1)
    labeler = RowLabeler(tokenizer, profile, prompts, device, capacity=span,
                         sink_tokens=stepflow.sink_tokens if stepflow is not None else 1)
    gens = None
    if sampling.temperature > 0:
        gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    responses: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    reasons = ["length"] * B
    cache = new_static_cache(model, span) if static else new_cache(model)
    fwd = {cache_kwarg(model): cache, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        fwd["logits_to_keep"] = 1
    step_fn = compiled_forward(decoding.compile) if decoding.compile else _forward_last
    session = nullcontext(None)
    if stepflow is not None:
        from .stepflow.handle import stepflow_session

        session = stepflow_session(model, tokenizer, stepflow, labeler)
    t0 = time.perf_counter()
    with session as sf, torch.inference_mode():
        logits = _forward_last(model, input_ids, mask, pos, fwd)
        for step in range(sampling.max_new_tokens):
            chosen = _choose(logits, sampling, gens).tolist()  # the one host read per token
            step_tokens: list[int | None] = []
            for b in range(B):
                if finished[b]:
                    step_tokens.append(None)
                    continue
                responses[b].append(chosen[b])
                step_tokens.append(chosen[b])
            labeler.push(step_tokens)  # labels of this token reach the device before its forward call
            for b in range(B):
                if not finished[b] and responses[b][-1] in stops:
                    finished[b], reasons[b] = True, "eos"
            if all(finished) or step == sampling.max_new_tokens - 1:
                break
            feed = torch.tensor([pad_id if t is None else t for t in step_tokens], device=device)[:, None]
            if not static:
                mask = torch.cat([mask, mask.new_ones((B, 1))], dim=1)
            pos = pos[:, -1:] + 1
            logits = step_fn(model, feed, mask, pos, fwd)
        stats = sf.row_stats() if sf is not None else None
    elapsed = time.perf_counter() - t0
    out = []
    for b in range(B):
        labels, note = labeler.trackers[b].finish()
        meta = {"stop": reasons[b], "new_tokens": len(responses[b]), "batch_seconds": round(elapsed, 3)}
        if decoding != DecodingConfig():
            meta["decoding"] = {"cache": decoding.cache, "compile": decoding.compile}
        if stats is not None:
            meta["stepflow"] = stats[b]
        out.append((responses[b], labels, note, meta))
    return out


def _choose(logits: torch.Tensor, sampling: SamplingConfig, gens) -> torch.Tensor:
    if gens is None:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < sampling.top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.stack([torch.multinomial(probs[b], 1, generator=g)[0] for b, g in enumerate(gens)])
