"""Step Momentum Injection: at the first token of a new thinking step, add ``alpha * m`` to each head's attention
output, ``m`` being the head's mean value vector over the step that just ended (math only)."""

from __future__ import annotations

import torch

from ..labels import THINKING


def step_means(
    value: torch.Tensor,
    fire_rows: torch.Tensor,
    fire_pos: torch.Tensor,
    prev_step: torch.Tensor,
    k_seg: torch.Tensor,
    k_step: torch.Tensor,
    k_pos: torch.Tensor,
    q_abs: torch.Tensor,
    window: int | None,
    sliding: int | None,
) -> torch.Tensor:
    """Mean value vectors (n, H_kv, D) for n firing queries.

    ``value``: (B, H_kv, k, D); ``fire_rows``/``fire_pos``: batch row and query index of each firing query;
    ``prev_step``: the thinking step that ended; ``k_*``: key labels and absolute positions (B, k) / (k,);
    ``q_abs``: absolute position of each firing query. Only keys the query can see are averaged (a sliding
    window hides older ones); ``window`` keeps the last ``window`` tokens of the step.
    """
    sel = (k_seg[fire_rows] == THINKING) & (k_step[fire_rows] == prev_step[:, None])  # (n, k)
    sel &= k_pos[None, :] < q_abs[:, None]
    if sliding:
        sel &= k_pos[None, :] > q_abs[:, None] - sliding
    if window is not None:
        sel &= k_pos[None, :] >= q_abs[:, None] - window
    w = sel.to(value.dtype)
    w = w / w.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.einsum("nk,nhkd->nhd", w, value[fire_rows])
