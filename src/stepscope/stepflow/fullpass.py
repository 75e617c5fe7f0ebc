"""StepFlow on teacher-forced passes over finished traces: the same edits, driven by replayed live labels.

This is what lets Step-Saliency be measured with StepFlow on (the mechanism check), and what the decode/full
consistency test compares against generation.
"""

from __future__ import annotations

import contextlib

import torch

from ..attention.dispatch import AttentionCall
from ..attention.scores import log_normaliser
from ..batch import model_device, pad_batch
from ..errors import StepscopeError
from ..labels import labels_from_spans, replay_labels
from ..profiles import get_profile
from ..trace import Trace
from .config import StepFlowConfig
from .handle import StepFlowHandle, apply
from .oeb import groups, odds_equal_bridge


class TeacherForced:
    """A StepFlow handle bound to a batch of finished traces (left-padded to one width)."""

    def __init__(self, handle: StepFlowHandle):
        self.handle = handle

    def saliency_edit(self, layer: int):
        """The attention weights OEB makes ``layer`` use, rebuilt per chunk for Step-Saliency (None: no edit)."""
        h = self.handle
        if layer not in h.resolved.oeb_layers or h.config.tau_max == 0:
            return None
        labels = h.bound_labels

        def edit(call: AttentionCall, b: int, q0: int, q1: int, k0: int, k1: int, logits: torch.Tensor):
            q_seg = labels.role[b : b + 1, q0:q1]  # the role each query acted as while generating
            k_seg = labels.segment[b : b + 1, k0:k1]
            bridge, current, editable = groups(q_seg, k_seg)
            log_norm = log_normaliser(call, logits)
            res = odds_equal_bridge(logits[None], log_norm[None], bridge, current, editable, h.config.tau_max,
                                    h.config.eps)
            return res.probs[0]

        return edit

    def row_stats(self):
        return self.handle.row_stats()


@contextlib.contextmanager
def teacher_forced(model, tokenizer, config: StepFlowConfig, traces: list[Trace], labels: str = "live"):
    """StepFlow active for forward passes over ``traces`` (left-padded, as :func:`stepscope.batch.pad_batch` lays
    them out)."""
    if labels not in ("live", "spans"):  # live: replay the step tracker; spans: the same labels built offline
        raise StepscopeError(f"labels must be 'live' or 'spans', got {labels!r}")
    build = replay_labels if labels == "live" else labels_from_spans
    handle = apply(model, tokenizer, config)
    try:
        device = model_device(model)
        rows = [(t.token_ids, t.prompt_len, get_profile(t.profile, tokenizer)) for t in traces]
        handle.bind_labels(build(tokenizer, rows, device, config.sink_tokens))
        yield TeacherForced(handle)
    finally:
        handle.remove()


def teacher_forced_logits(model, tokenizer, traces: list[Trace], config: StepFlowConfig | None = None,
                          labels: str = "live"):
    """Next-token logits (B, T, V) of left-padded ``traces``, with StepFlow on when ``config`` is given
    (``labels``: see :func:`teacher_forced`)."""
    batch = pad_batch(model, tokenizer, [t.token_ids for t in traces])
    session = (teacher_forced(model, tokenizer, config, traces, labels) if config is not None
               else contextlib.nullcontext())
    with session, torch.no_grad():
        return model(**batch.forward_kwargs(), use_cache=False).logits
