"""Per-layer Step-Saliency from one layer's saved attention inputs and output gradient, pooled on the fly.

For a layer, ``I[t, k] = mean_h |A[h,t,k] * G[h,t,k]|`` with ``G = dO V^T`` (since ``O = A V``). Rows are
processed ``chunk`` query positions at a time against only the keys they can see, and each chunk is pooled into
step x step sums at once, so nothing of size T x T per head is ever kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..attention.dispatch import AttentionCall
from ..attention.scores import compute_dtype, group_queries, key_range, logits_block, probabilities, ungroup
from ..errors import StepscopeError

# edit(call, b, q0, q1, k0, k1, logits) -> probs: the weights an attention edit (OEB) made the layer use.
ProbEdit = Callable[[AttentionCall, int, int, int, int, int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepIndex:
    """Step ids of a row's tokens (``-1``: in no step) and the number of steps."""

    ids: torch.Tensor  # (T,) long, on the model's device
    n_steps: int


def rows_per_chunk(heads: int, keys: int, budget_mb: float) -> int:
    """Query rows per chunk so that the chunk's working tensors (about 3 x heads x rows x keys floats) fit."""
    per_row = 3 * heads * max(keys, 1) * 4
    rows = int(budget_mb * 2**20 // per_row)
    if rows < 1:
        need = per_row / 2**20
        raise StepscopeError(
            f"a chunk budget of {budget_mb} MB cannot hold one query row of a {keys}-token trace "
            f"({heads} heads); use at least {need:.3g} MB (--chunk-mb)"
        )
    return rows


def layer_step_sums(
    call: AttentionCall,
    grad_out: torch.Tensor,
    rows: list[StepIndex],
    *,
    budget_mb: float = 256,
    edit: ProbEdit | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pooled saliency of one layer for each batch row.

    ``grad_out``: dL/dO as the attention function returned it, (B, T, H, D). Returns, per row, the (S, S) sums
    and the (S,) saliency each step sends to tokens in no step (the attention-sink first token), in float64.
    """
    with torch.no_grad():
        return _layer_step_sums(call, grad_out, rows, budget_mb, edit)


def _layer_step_sums(call, grad_out, rows, budget_mb, edit):
    _, H, T, _ = call.query.shape
    q_offset = call.key.shape[2] - T
    dO = grad_out.transpose(1, 2)  # (B, H, T, D)
    # at most ~1/8 of the rows per chunk: a chunk computes against all keys up to its last row, so smaller
    # chunks waste less of the causal triangle
    chunk = min(rows_per_chunk(H, call.key.shape[2], budget_mb), max(64, -(-T // 8)))
    sums, other = [], []
    for b, idx in enumerate(rows):
        S = idx.n_steps
        acc = torch.zeros(S + 1, S + 1, dtype=torch.float64, device=call.query.device)
        key_ids = torch.where(idx.ids < 0, S, idx.ids)  # column S collects keys in no step
        key_onehot = torch.nn.functional.one_hot(key_ids, S + 1).to(compute_dtype(call.query).dtype)
        valid = (idx.ids[q_offset:] >= 0).nonzero()
        if valid.numel():
            first, last = int(valid[0]), int(valid[-1]) + 1
            for q0 in range(first, last, chunk):
                q1 = min(q0 + chunk, last)
                _chunk_into(call, dO, b, q0, q1, q_offset, idx.ids, key_onehot, acc, edit)
        sums.append(acc[:S, :S])
        other.append(acc[:S, S])
    return sums, other


def _chunk_into(call, dO, b, q0, q1, q_offset, step_ids, key_onehot, acc, edit) -> None:
    k0, k1 = key_range(call, q0, q1, q_offset)
    logits = logits_block(call, b, q0, q1, k0, k1, q_offset)  # (H, c, kl)
    probs = probabilities(call, logits) if edit is None else edit(call, b, q0, q1, k0, k1, logits)
    H = probs.shape[0]
    v = compute_dtype(call.value[b, :, k0:k1])  # (H_kv, kl, D)
    g = ungroup(group_queries(compute_dtype(dO[b, :, q0:q1]), v.shape[0]) @ v.transpose(-1, -2), H)  # dL/dA
    probs.mul_(g.abs_())  # |A * G| per head (A >= 0)
    # Steps are contiguous, so the chunk's rows form a few runs of one query step each; summing rows per run
    # (and over heads) is one small matmul with a 0/1 run matrix instead of many strided reductions.
    q_ids = step_ids[q_offset + q0 : q_offset + q1]
    change = torch.nonzero(q_ids[1:] != q_ids[:-1]).flatten() + 1
    starts = torch.cat([change.new_zeros(1), change])
    run_step = q_ids[starts]
    keep = run_step >= 0
    if not bool(keep.any()):
        return
    run_of_row = torch.cumsum(torch.zeros_like(q_ids).index_fill_(0, change, 1), 0)
    runs = torch.zeros(len(starts), len(q_ids), dtype=probs.dtype, device=probs.device)
    runs[run_of_row, torch.arange(len(q_ids), device=probs.device)] = 1.0
    runs = runs[keep]
    pooled = torch.matmul(runs, probs).sum(0).div_(H)  # (runs, kl): head mean, summed over each run's rows
    by_key = pooled @ key_onehot[k0:k1]  # (runs, S + 1): summed over each key step
    acc.index_add_(0, run_step[keep], by_key.to(acc.dtype))
