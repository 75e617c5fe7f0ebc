"""Batched generation (left padding, greedy or sampled) that returns segmented :class:`Trace` objects.

The loop is our own so that every row is tracked online token by token (the step tracker's live labels are
what StepFlow acts on) and so that sampling is per row: row ``i`` draws from its own generator seeded with
``seeds[i]``, so a sample does not depend on which other prompts share its batch.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from .batch import model_device, pad_batch
from .batch import pad_id as batch_pad_id
from .errors import StepscopeError
from .labels import RowLabeler
from .profiles import FormatProfile, get_profile
from .prompting import prompt_ids as build_prompt_ids
from .sampling import SamplingConfig, StopStrings, _stop_strings, logits_processors
from .trace import Trace

__all__ = ["DecodingConfig", "SamplingConfig", "generate"]  # SamplingConfig lives in stepscope.sampling


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
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    stop: str | Sequence[str] = (),
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

    Greedy when ``temperature == 0``; otherwise sampling at that temperature, with row ``i`` seeded by
    ``seeds[i]`` (default ``seed + i``). ``top_k`` (0: off), ``top_p`` (1: off) and ``min_p`` (0: off) filter
    what is sampled; ``repetition_penalty`` (1: off) applies to greedy decoding too; ``stop``: strings that end a
    row once its generated text contains one (the token completing it is kept; ``meta["stop"]`` is then
    ``"stop_string"``). They run through transformers' own logits processors, in ``model.generate``'s order (see
    :mod:`stepscope.sampling`); Qwen3's thinking setting is ``temperature=0.6, top_p=0.95, top_k=20, min_p=0``.
    Each trace's ``meta["sampling"]`` records every sampling setting. ``stepflow``: a
    :class:`stepscope.StepFlowConfig` to generate with StepFlow on, or the settings of any registered intervention
    (:mod:`stepscope.stepflow.intervention`); each trace's ``meta["stepflow"]`` then holds what it did.
    ``ignore_eos``: always generate ``max_new_tokens`` (for timing). ``cache_implementation``: ``"dynamic"``
    (default) or ``"static"`` (a preallocated cache; StepFlow labels are sized to it). ``compile``: decode with a
    ``torch.compile``d step (True picks CUDA graphs on a GPU; or give a mode such as ``"default"``); implies the
    static cache. Tokens equal eager decoding's up to the compiler's floating-point reordering.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise StepscopeError("no prompts to generate from")
    if batch_size < 1:
        raise StepscopeError("batch_size must be at least 1")
    if max_new_tokens < 1:
        raise StepscopeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    # a lone string is one stop string: normalised (and checked) into the tuple the config holds
    sampling = SamplingConfig(temperature, top_p, top_k, min_p, repetition_penalty, _stop_strings(stop))
    decoding = DecodingConfig.of(cache_implementation, compile, next(model.parameters()).device)
    prof = get_profile(profile, tokenizer)
    if seeds is None:
        seeds = [seed + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise StepscopeError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    ids = [build_prompt_ids(tokenizer, p, system=system, chat=chat) for p in prompts]
    context = getattr(model.config, "max_position_embeddings", None)
    for p in ids:
        if context and len(p) >= context:
            raise StepscopeError(
                f"a prompt of {len(p)} tokens does not fit the model's context of {context} tokens; shorten it"
            )

    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))  # similar lengths share a batch
    out: list[Trace | None] = [None] * len(prompts)
    bar = _TokenProgress(len(prompts), max_new_tokens, progress)
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            new_tokens = max_new_tokens
            longest = max(len(ids[i]) for i in rows)
            if context and longest + new_tokens > context:
                new_tokens = context - longest
                warnings.warn(f"max_new_tokens cut to {new_tokens} to stay within the model's context of {context}",
                              stacklevel=2)
                bar.tokens((max_new_tokens - new_tokens) * len(rows))  # budget these rows will never use
            batch = _generate_batch(
                model, tokenizer, prof, [ids[i] for i in rows], [seeds[i] for i in rows], sampling, new_tokens,
                stepflow, ignore_eos, decoding, tick=bar.tokens,
            )
            for i, (resp, labels, note, meta) in zip(rows, batch):
                # "stop" in meta is why the row stopped; the stop strings are in meta["sampling"]["stop"]
                meta.update(max_new_tokens=new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                            seed=seeds[i], sampling=sampling.to_dict())
                out[i] = Trace.from_ids(
                    tokenizer, ids[i] + resp, len(ids[i]), question=prompts[i], profile=prof, model=name,
                    meta=meta, labels=labels, note=note,
                )
            bar.prompts_done(len(rows))
    finally:
        bar.close()
    return out  # type: ignore[return-value]


class _TokenProgress:
    """The generation bar: generated tokens out of ``prompts x max_new_tokens``, so it moves within one batch
    (and for a single question). Each decode step adds the rows still generating; a row that stops early (end of
    sequence, a stop string) is credited its unused budget then, so the bar ends exactly at its total."""

    def __init__(self, prompts: int, max_new_tokens: int, enabled: bool):
        from . import progress  # on stderr; plain periodic lines when stderr is a log

        self._prompts, self._done = prompts, 0
        self.bar = progress.bar(prompts * max_new_tokens, "generating", "token", enabled=enabled)
        if prompts > 1:
            self.bar.set_postfix_str(self._postfix(), refresh=False)

    def _postfix(self) -> str:
        return f"prompts {self._done}/{self._prompts}"

    def tokens(self, n: int) -> None:
        if n:
            self.bar.update(n)

    def prompts_done(self, n: int) -> None:
        self._done += n
        if self._prompts > 1:
            self.bar.set_postfix_str(self._postfix(), refresh=False)

    def close(self) -> None:
        self.bar.close()


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


def _generate_batch(model, tokenizer, profile, prompts, seeds, sampling: SamplingConfig, max_new_tokens: int,
                    stepflow, ignore_eos=False, decoding: DecodingConfig = DecodingConfig(),
                    tick: Callable[[int], None] | None = None):
    """Decode one left-padded batch. ``tick(n)``: called with the number of tokens generated (plus the unused
    budget of rows that stopped) after each decode step, for a progress bar."""
    device = model_device(model)
    pad_id = batch_pad_id(tokenizer)
    stops = set() if ignore_eos else eos_ids(model, tokenizer)
    B = len(prompts)
    first = pad_batch(model, tokenizer, prompts)
    input_ids, mask, pos, width = first.ids, first.mask, first.positions, first.width
    static = decoding.cache == "static"
    span = width + max_new_tokens
    if static:
        span = -(-span // STATIC_BUCKET) * STATIC_BUCKET
        # one fixed-width mask for every call (slots past the current length are masked as the future)
        mask = torch.cat([mask, mask.new_ones((B, span - width))], dim=1)
    sink_tokens = 1
    if stepflow is not None:
        from .stepflow.handle import sink_tokens_of

        sink_tokens = sink_tokens_of(stepflow)
    labeler = RowLabeler(tokenizer, profile, prompts, device, capacity=span, sink_tokens=sink_tokens)
    gens = None
    if sampling.temperature > 0:
        gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    # transformers' processors, row by row; the repetition penalty skips each row's left padding
    processors = logits_processors(sampling, pad_lengths=[width - len(p) for p in prompts])
    stop_strings = StopStrings(sampling.stop, B)
    responses: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    reasons = ["length"] * B
    matched: list[str | None] = [None] * B
    cache = new_static_cache(model, span) if static else new_cache(model)
    fwd = {cache_kwarg(model): cache, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        fwd["logits_to_keep"] = 1
    step_fn = compiled_forward(decoding.compile) if decoding.compile else _forward_last
    session: AbstractContextManager[Any] = nullcontext(None)  # yields the StepFlow handle, or None
    if stepflow is not None:
        from .stepflow.handle import session as intervention_session

        session = intervention_session(model, tokenizer, stepflow, labeler)
    t0 = time.perf_counter()
    with session as sf, torch.inference_mode():
        # prompt + generated ids per row, what the repetition penalty looks at (finished rows' columns: unused)
        history = None
        if sampling.repetition_penalty != 1.0:
            history = torch.cat([input_ids, input_ids.new_full((B, max_new_tokens), pad_id)], dim=1)
        logits = _forward_last(model, input_ids, mask, pos, fwd)
        for step in range(max_new_tokens):
            picked = _choose(logits, processors, history[:, : width + step] if history is not None else input_ids,
                             gens)
            if history is not None:
                history[:, width + step] = picked
            chosen = picked.tolist()  # the one host read per token
            live = B - sum(finished)
            step_tokens: list[int | None] = []
            for b in range(B):
                if finished[b]:
                    step_tokens.append(None)
                    continue
                responses[b].append(chosen[b])
                step_tokens.append(chosen[b])
            labeler.push(step_tokens)  # labels of this token reach the device before its forward call
            unused = 0
            for b in range(B):
                if step_tokens[b] is None:
                    continue
                if responses[b][-1] in stops:
                    finished[b], reasons[b] = True, "eos"
                elif stop_strings and (hit := stop_strings.push(b, labeler.trackers[b].texts[-1])) is not None:
                    finished[b], reasons[b], matched[b] = True, "stop_string", hit
                if finished[b]:
                    unused += max_new_tokens - len(responses[b])
            if tick is not None:
                tick(live + unused)
            if all(finished) or step == max_new_tokens - 1:
                break
            feed = torch.tensor([pad_id if t is None else t for t in step_tokens], device=device)[:, None]
            if not static:
                mask = torch.cat([mask, mask.new_ones((B, 1))], dim=1)
            pos = pos[:, -1:] + 1
            logits = step_fn(model, feed, mask, pos, fwd)
        stats = sf.row_stats() if sf is not None else None
        flows = sf.flow_tokens() if sf is not None else None  # the flow monitor's per-token bridge masses
    elapsed = time.perf_counter() - t0
    out = []
    for b in range(B):
        labels, note = labeler.trackers[b].finish()
        meta = {"stop": reasons[b], "new_tokens": len(responses[b]), "batch_seconds": round(elapsed, 3)}
        if matched[b] is not None:
            meta["stop_string"] = matched[b]
        if decoding != DecodingConfig():
            meta["decoding"] = {"cache": decoding.cache, "compile": decoding.compile}
        if stats is not None:
            meta["stepflow"] = stats[b]
        if flows and sf.monitor_bands is not None:
            from .stepflow.monitor import FlowRecord, thinking_spans

            record = FlowRecord.from_tokens(flows[b], thinking_spans(labels, len(prompts[b])), *sf.monitor_bands)
            meta["flow"] = record.to_dict()
        out.append((responses[b], labels, note, meta))
    return out


def _choose(logits: torch.Tensor, processors, seen_ids: torch.Tensor, gens) -> torch.Tensor:
    """The next token of every row: ``processors(seen_ids, logits)`` (transformers' logits processors, see
    :func:`stepscope.sampling.logits_processors`), then the argmax (``gens`` None: greedy) or one draw per row
    from its own generator."""
    if gens is not None or processors:
        if logits.dtype not in (torch.float32, torch.float64):  # filters and penalties compare values: not in 16 bits
            logits = logits.float()
        if processors:
            logits = processors(seen_ids, logits)
    if gens is None:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.stack([torch.multinomial(probs[b], 1, generator=g)[0] for b, g in enumerate(gens)])
