"""``step_saliency``: the public entry point."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import overload

from ..defaults import BAND_FRACTION, CHUNK_MB, KEEP_MB, SALIENCY_TARGET
from ..errors import StepscopeError
from ..trace import Trace
from .engine import SaliencyOptions, compute_batch
from .result import StepSaliency, causal_counts


@overload
def step_saliency(
    model,
    tokenizer,
    trace_or_traces: Trace,
    *,
    target: str = ...,
    chunk_mb: float = ...,
    keep_mb: float = ...,
    batch_size: int = ...,
    stepflow=...,
    band_fraction: float = ...,
    method: str = ...,
    progress: bool = ...,
) -> StepSaliency: ...


@overload
def step_saliency(
    model,
    tokenizer,
    trace_or_traces: Sequence[Trace],
    *,
    target: str = ...,
    chunk_mb: float = ...,
    keep_mb: float = ...,
    batch_size: int = ...,
    stepflow=...,
    band_fraction: float = ...,
    method: str = ...,
    progress: bool = ...,
) -> list[StepSaliency]: ...


def step_saliency(
    model,
    tokenizer,
    trace_or_traces: Trace | Sequence[Trace],
    *,
    target: str = SALIENCY_TARGET,
    chunk_mb: float = CHUNK_MB,
    keep_mb: float = KEEP_MB,
    batch_size: int = 1,
    stepflow=None,
    band_fraction: float = BAND_FRACTION,
    method: str = "auto",
    progress: bool = True,
) -> StepSaliency | list[StepSaliency]:
    """Per-layer step-to-step saliency maps of one trace (or a list of traces).

    ``target``: which next-token losses form L — ``"all"`` (every target token), ``"generated"`` (response
    tokens) or ``"summary"`` (summary tokens). ``chunk_mb``: memory budget of one chunk of query rows.
    ``keep_mb``: memory for keeping the top layers' autograd graphs from the first pass instead of recomputing
    them (faster; 0 recomputes every layer, the leanest setting).
    ``batch_size``: traces computed together (left-padded). ``stepflow``: a ``StepFlowConfig`` (or any registered
    intervention) to measure the flow with its edits on (teacher-forced). The model is left exactly as it was.
    """
    single = isinstance(trace_or_traces, Trace)
    traces: list[Trace] = [trace_or_traces] if isinstance(trace_or_traces, Trace) else list(trace_or_traces)
    if not traces:
        raise StepscopeError("no traces given")
    for t in traces:
        if not isinstance(t, Trace):
            raise StepscopeError(f"expected stepscope.Trace objects, got {type(t).__name__}")
        if len(t.steps) < 2:
            raise StepscopeError(
                f"the trace has {len(t.steps)} step(s) ({', '.join(t.labels) or 'none'}); Step-Saliency needs a "
                "question and at least one response step — generate a longer response"
            )
    if batch_size < 1:
        raise StepscopeError("batch_size must be at least 1")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(model.config, "vocab_size", None)
    if vocab:
        for t in traces:
            t.check_vocab(int(vocab), getattr(model, "name_or_path", None))
    opts = SaliencyOptions(target=target, chunk_mb=chunk_mb, keep_mb=keep_mb, method=method, progress=progress)
    import contextlib

    if stepflow is not None:
        from ..stepflow.fullpass import teacher_forced
        from ..stepflow.intervention import intervention_to_dict
    order = sorted(range(len(traces)), key=lambda i: len(traces[i]))
    out: list[StepSaliency | None] = [None] * len(traces)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [traces[i] for i in idx]
        t0 = time.perf_counter()
        session = (teacher_forced(model, tokenizer, stepflow, batch) if stepflow is not None
                   else contextlib.nullcontext())
        with session as sf:
            res = compute_batch(model, tokenizer, batch, opts, None if sf is None else sf.saliency_edit)
        seconds = time.perf_counter() - t0
        for k, i in enumerate(idx):
            t = traces[i]
            meta = {
                "model": t.model, "question": t.question, "profile": t.profile, "tokens": len(t),
                "prompt_len": t.prompt_len, "loss": res.loss[k], "target": target, "seconds": round(seconds, 3),
                "stepflow": None if stepflow is None else intervention_to_dict(stepflow), "trace_meta": t.meta,
            }
            out[i] = StepSaliency(res.sums[k].double().numpy(), causal_counts(t.steps), res.other[k].double().numpy(),
                                  list(t.steps), meta, band_fraction)
    results = [r for r in out if r is not None]  # every trace is in exactly one batch
    return results[0] if single else results
