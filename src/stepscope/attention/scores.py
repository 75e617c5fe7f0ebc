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


def logits_block(call: AttentionCall, b, q0: int, q1: int, k0: int, k1: int, q_offset: int,
                 fused: bool = False) -> torch.Tensor:
    """Masked attention logits of batch row ``b`` (H, c, k), or of rows ``b`` (a slice) (n, H, c, k).

    Query index ``i`` sits at absolute position ``q_offset + i``; disallowed keys get -inf. ``fused``: write the
    product as a broadcast multiply and sum, which a compiler turns into one pass over the keys in their own
    dtype (no float32 copy of the cache); only for compiled code with few query rows, as eager code would
    materialise it.
    """
    rows = b if isinstance(b, slice) else slice(b, b + 1)
    q = compute_dtype(call.query[rows, :, q0:q1])  # (n, H, c, D)
    k = compute_dtype(call.key[rows, :, k0:k1])  # (n, H_kv, kl, D)
    n, H, c, D = q.shape
    n_kv = k.shape[1]
    q = q * call.scaling  # scaling the (smaller) queries saves a pass over the logits
    q = q.reshape(n, n_kv, (H // n_kv) * c, D)
    raw = (q[:, :, :, None] * k[:, :, None]).sum(-1) if fused else q @ k.transpose(-1, -2)
    logits = raw.reshape(n, H, c, k.shape[2])
    cap = call.softcap
    if cap:
        logits = torch.tanh(logits / cap) * cap
    _apply_mask(call, logits, rows, q0, q1, k0, k1, q_offset)
    return logits if isinstance(b, slice) else logits[0]


def _apply_mask(call: AttentionCall, logits: torch.Tensor, rows: slice, q0, q1, k0, k1, q_offset) -> None:
    mask = call.attention_mask
    device = logits.device
    if mask is not None and mask.dim() == 4:
        m = mask[rows if mask.shape[0] > 1 else slice(None), :, q0:q1, k0:k1]
        if m.dtype == torch.bool:
            logits.masked_fill_(~m, float("-inf"))
        else:  # additive float mask, as eager attention adds it
            logits.add_(m.to(logits.dtype))
            logits.masked_fill_(m <= torch.finfo(m.dtype).min / 2, float("-inf"))
        return
    w = sliding_window_of(call)
    if mask is None and not w:
        # purely causal: only the block of keys at or after the first query can hold future positions
        start = q_offset + q0 - k0
        if start < k1 - k0:
            block = logits[..., start:]
            future = torch.ones(block.shape[-2:], dtype=torch.bool, device=device).triu(1)
            block.masked_fill_(future, float("-inf"))
        return
    # no 4D mask: causal (+ window) by position, and a 2D padding mask if given (flash attention)
    qpos = torch.arange(q_offset + q0, q_offset + q1, device=device)[:, None]
    kpos = torch.arange(k0, k1, device=device)[None, :]
    allowed = (kpos <= qpos)[None, None]
    if w:
        allowed = allowed & (kpos > qpos - w)[None, None]
    if mask is not None and mask.dim() == 2:
        allowed = allowed & mask[rows, k0:k1].bool()[:, None, None, :]
    logits.masked_fill_(~allowed, float("-inf"))


def log_normaliser(call: AttentionCall, logits: torch.Tensor) -> torch.Tensor:
    """log of the softmax denominator per (head, row), including GPT-OSS sink logits."""
    lse = torch.logsumexp(logits, dim=-1)  # (..., H, c)
    sinks = call.sinks
    if sinks is not None:  # (H,) -> broadcast over rows and queries
        lse = torch.logaddexp(lse, sinks.detach().to(lse.device, lse.dtype).view(-1, 1))
    return lse


def probabilities(call: AttentionCall, logits: torch.Tensor) -> torch.Tensor:
    """Post-softmax weights over the real keys (may reuse ``logits``' storage)."""
    if call.sinks is None:
        p = torch.softmax(logits, dim=-1)
    else:
        lse = log_normaliser(call, logits)
        p = logits.sub_(lse.unsqueeze(-1)).exp_()
    if call.attention_mask is None and call.sinks is None:
        return p  # causal without padding: every row sees at least itself
    return torch.nan_to_num_(p, nan=0.0)  # rows with no visible key (padding queries)
