"""Rebuilding attention probabilities for a block of query rows from what the model passed to its attention
function (queries and keys after RoPE / norms, the mask it built, scaling, sinks, soft-capping).

This is not a second attention implementation for running the model: the model's own kernel (SDPA, eager,
flash) produces every output. These helpers recover the post-softmax weights it used, a chunk of rows at a time,
for Step-Saliency and for the group masses OEB needs.
"""

from __future__ import annotations

import torch

from .dispatch import AttentionCall


def compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half-precision models are rebuilt in float32; float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def group_queries(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(H, c, D) -> (H_kv, n_rep * c, D): queries of the heads that share a key/value head, stacked."""
    H, c, D = q.shape
    return q.reshape(n_kv, (H // n_kv) * c, D)


def ungroup(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(H_kv, n_rep * c, k) -> (H, c, k)."""
    n_kv, rc, k = x.shape
    return x.reshape(heads, rc // (heads // n_kv), k)


def sliding_window_of(call: AttentionCall) -> int | None:
    w = call.kwargs.get("sliding_window")
    if w is None:
        w = getattr(call.module, "sliding_window", None)
    return int(w) if w else None


def key_range(call: AttentionCall, q0: int, q1: int, q_offset: int) -> tuple[int, int]:
    """Keys that rows ``q0:q1`` (query index; absolute position = q_offset + index) can see: causal, windowed."""
    k1 = q_offset + q1
    w = sliding_window_of(call)
    k0 = max(0, q_offset + q0 - w + 1) if w else 0
    return k0, k1


def logits_block(call: AttentionCall, b: int, q0: int, q1: int, k0: int, k1: int, q_offset: int) -> torch.Tensor:
    """Masked attention logits (H, q1-q0, k1-k0) of row ``b``; disallowed keys are -inf."""
    q = compute_dtype(call.query[b, :, q0:q1])  # (H, c, D)
    k = compute_dtype(call.key[b, :, k0:k1])  # (H_kv, kl, D)
    H, n_kv = q.shape[0], k.shape[0]
    logits = ungroup(group_queries(q, n_kv) @ k.transpose(-1, -2), H)
    logits.mul_(call.scaling)
    cap = call.softcap
    if cap:
        logits = torch.tanh(logits / cap) * cap
    _apply_mask(call, logits, b, q0, q1, k0, k1, q_offset)
    return logits


def _apply_mask(call: AttentionCall, logits: torch.Tensor, b, q0, q1, k0, k1, q_offset) -> None:
    mask = call.attention_mask
    device = logits.device
    if mask is not None and mask.dim() == 4:
        m = mask[b if mask.shape[0] > 1 else 0, :, q0:q1, k0:k1]
        if m.dtype == torch.bool:
            logits.masked_fill_(~m, float("-inf"))
        else:  # additive float mask, as eager attention adds it
            logits.add_(m.to(logits.dtype))
            logits.masked_fill_(m <= torch.finfo(m.dtype).min / 2, float("-inf"))
        return
    # no 4D mask: causal (+ window) by position, and a 2D padding mask if given (flash attention)
    qpos = torch.arange(q_offset + q0, q_offset + q1, device=device)[:, None]
    kpos = torch.arange(k0, k1, device=device)[None, :]
    allowed = kpos <= qpos
    w = sliding_window_of(call)
    if w:
        allowed &= kpos > qpos - w
    if mask is not None and mask.dim() == 2:
        allowed &= mask[b, k0:k1].bool()[None, :]
    logits.masked_fill_(~allowed, float("-inf"))


def log_normaliser(call: AttentionCall, logits: torch.Tensor) -> torch.Tensor:
    """log of the softmax denominator per (head, row), including GPT-OSS sink logits."""
    lse = torch.logsumexp(logits, dim=-1)  # (H, c)
    sinks = call.sinks
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.detach().to(lse.device, lse.dtype).view(-1, 1))
    return lse


def probabilities(call: AttentionCall, logits: torch.Tensor, out: bool = True) -> torch.Tensor:
    """Post-softmax weights over the real keys (in place on ``logits`` when ``out``)."""
    lse = log_normaliser(call, logits)
    p = logits if out else logits.clone()
    p.sub_(lse.unsqueeze(-1)).exp_()
    return torch.nan_to_num_(p, nan=0.0)  # rows with no visible key (padding queries)
