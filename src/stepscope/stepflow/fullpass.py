"""Interventions on teacher-forced passes over finished traces: the same edits, driven by replayed live labels.

This is what lets Step-Saliency be measured with StepFlow on (the mechanism check), and what the decode/full
consistency test compares against generation.
"""

from __future__ import annotations

import contextlib

import torch

from ..batch import model_device, pad_batch
from ..errors import StepscopeError
from ..labels import labels_from_spans, replay_labels
from ..profiles import get_profile
from ..trace import Trace
from .handle import apply, sink_tokens_of
from .intervention import Intervention


@contextlib.contextmanager
def teacher_forced(model, tokenizer, config: Intervention, traces: list[Trace], labels: str = "live"):
    """An intervention (StepFlow, a control, a plug-in) active for forward passes over ``traces`` (left-padded, as
    :func:`stepscope.batch.pad_batch` lays them out); yields its handle (``saliency_edit`` serves Step-Saliency,
    ``row_stats`` says what it did)."""
    if labels not in ("live", "spans"):  # live: replay the step tracker; spans: the same labels built offline
        raise StepscopeError(f"labels must be 'live' or 'spans', got {labels!r}")
    build = replay_labels if labels == "live" else labels_from_spans
    handle = apply(model, tokenizer, config)
    try:
        device = model_device(model)
        rows = [(t.token_ids, t.prompt_len, get_profile(t.profile, tokenizer)) for t in traces]
        handle.bind_labels(build(tokenizer, rows, device, sink_tokens_of(config)))
        yield handle
    finally:
        handle.remove()


def teacher_forced_logits(model, tokenizer, traces: list[Trace], config: Intervention | None = None,
                          labels: str = "live"):
    """Next-token logits (B, T, V) of left-padded ``traces``, with the intervention on when ``config`` is given
    (``labels``: see :func:`teacher_forced`)."""
    batch = pad_batch(model, tokenizer, [t.token_ids for t in traces])
    session = (teacher_forced(model, tokenizer, config, traces, labels) if config is not None
               else contextlib.nullcontext())
    with session, torch.no_grad():
        return model(**batch.forward_kwargs(), use_cache=False).logits
