"""Brute-force Step-Saliency: eager attention, every layer's attention weights kept with retained gradients,
dense pooling. For tests and benchmarks only (memory grows with layers x heads x T x T)."""

from __future__ import annotations

import numpy as np
import torch

from ..trace import Trace
from .engine import target_weights


def reference_sums(model, trace: Trace, target: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """(L, S, S) saliency sums and (L, S) sums into tokens in no step, computed the slow, obvious way."""
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        ids = torch.tensor([trace.token_ids], device=next(model.parameters()).device)
        weights = target_weights([trace], len(trace), target, ids.device)[0]
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
        attentions = out.attentions
        for a in attentions:
            a.retain_grad()
        logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
        ce = -logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
        (ce * weights[:-1]).sum().backward()
        step_of = trace.step_ids()
        S = len(trace.steps)
        sums = np.zeros((len(attentions), S, S))
        other = np.zeros((len(attentions), S))
        for layer, a in enumerate(attentions):
            sal = (a[0] * a.grad[0]).abs().mean(0).detach().double().cpu().numpy()  # (T, T)
            for i in range(S):
                rows = step_of == i
                for j in range(S):
                    sums[layer, i, j] = sal[np.ix_(rows, step_of == j)].sum()
                other[layer, i] = sal[np.ix_(rows, step_of < 0)].sum()
        model.zero_grad(set_to_none=True)
        return sums, other
    finally:
        model.set_attn_implementation(original)
