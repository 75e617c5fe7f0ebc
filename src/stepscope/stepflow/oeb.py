"""Odds-Equal Bridge: per head and query, lift the bridge group's attention mass to tau_B (math only).

For a query in thinking: S = thinking keys so far, B = question keys; in the summary: S = summary so far,
B = thinking. O is everything else (sink token, padding, other segments, GPT-OSS sink logits) and keeps its
mass. ``tau_B = min(sqrt(|B|/(|B|+|S|)), tau_max)``, clamped to ``1 - p(O) - eps``; when ``p(B) < tau_B`` and
``p(S) > eps`` each group is rescaled to masses (tau_B, tau_S = 1 - p(O) - tau_B) keeping its internal
proportions: ``z_k += log(tau_g / p(g))`` for k in group g (the KL projection onto those group masses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..labels import QUESTION, SUMMARY, THINKING


@dataclass
class OEBResult:
    probs: torch.Tensor  # (..., c, k) edited where ``edited``, original elsewhere
    edited: torch.Tensor  # (..., c) bool
    bridge_before: torch.Tensor  # (..., c) p(B)
    bridge_after: torch.Tensor  # (..., c)
    tau_b: torch.Tensor  # (..., c)


def groups(q_seg: torch.Tensor, k_seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bridge and current-segment key masks (B, 1, c, k) and editable query rows (B, 1, c)."""
    qt = (q_seg == THINKING)[:, None, :, None]
    qs = (q_seg == SUMMARY)[:, None, :, None]
    kq = (k_seg == QUESTION)[:, None, None, :]
    kt = (k_seg == THINKING)[:, None, None, :]
    ks = (k_seg == SUMMARY)[:, None, None, :]
    bridge = (qt & kq) | (qs & kt)
    current = (qt & kt) | (qs & ks)
    return bridge, current, (qt | qs)[..., 0]


def odds_equal_bridge(
    logits: torch.Tensor,
    log_norm: torch.Tensor,
    bridge: torch.Tensor,
    current: torch.Tensor,
    editable: torch.Tensor,
    tau_max: float,
    eps: float,
) -> OEBResult:
    """Apply OEB to masked logits (..., c, k) whose softmax normaliser (sinks included) is ``log_norm``."""
    neg = torch.finfo(logits.dtype).min
    visible = torch.isfinite(logits)
    lse_b = torch.logsumexp(logits.masked_fill(~bridge, neg), dim=-1)
    lse_s = torch.logsumexp(logits.masked_fill(~current, neg), dim=-1)
    n_b = (visible & bridge).sum(-1).to(logits.dtype)
    n_s = (visible & current).sum(-1).to(logits.dtype)
    has_b, has_s = n_b > 0, n_s > 0
    p_b = torch.where(has_b, torch.exp(lse_b - log_norm), torch.zeros_like(lse_b))
    p_s = torch.where(has_s, torch.exp(lse_s - log_norm), torch.zeros_like(lse_s))
    p_o = (1.0 - p_b - p_s).clamp_min(0.0)
    total = (n_b + n_s).clamp_min(1.0)
    tau_b = torch.minimum(torch.sqrt(n_b / total), torch.full_like(n_b, tau_max))
    tau_b = torch.minimum(tau_b, 1.0 - p_o - eps)
    edit = editable & has_b & (p_b < tau_b) & (p_s > eps)
    tau_s = 1.0 - p_o - tau_b
    # within-group softmax times the group's new mass, written as shifts of the logits
    safe_b = torch.where(edit, tau_b, torch.ones_like(tau_b))
    safe_s = torch.where(edit, tau_s, torch.ones_like(tau_s))
    shift_b = torch.log(safe_b) - lse_b + log_norm
    shift_s = torch.log(safe_s) - lse_s + log_norm
    shift = torch.where(bridge, shift_b[..., None], torch.where(current, shift_s[..., None], 0.0))
    shift = torch.where(edit[..., None], shift, 0.0)
    probs = torch.exp(logits + shift - log_norm[..., None])
    probs = torch.nan_to_num(probs, nan=0.0)
    after = torch.where(edit, tau_b, p_b)
    return OEBResult(probs, edit, p_b, after, tau_b)
