"""Step Momentum Injection as an edit of an installed intervention: at the first token of a new thinking step,
``alpha`` times the finished step's mean value vector is added to each head's output (the math of :mod:`.smi`).

While decoding, full-attention layers keep a running value sum of the step being written, so a step boundary
reads the finished step's mean in O(1) instead of a pass over the keys; sliding-window layers and ``smi_window``
average the keys the query can see. Teacher-forced passes inject at every step start at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..attention.dispatch import AttentionCall
from ..attention.scores import compute_dtype, log_normaliser, logits_block, sliding_window_of
from ..errors import StepscopeError
from ..labels import THINKING, mark_static
from .config import ResolvedStepFlow, StepFlowConfig
from .intervention import Edit
from .smi import step_means

if TYPE_CHECKING:
    from .handle import InterventionHandle, Views


@dataclass
class _Running:
    """SMI running sums: per full-attention layer, the value sum of the thinking step being written; shared by
    those layers (they see the same tokens), its index (-1 before the first thinking token) and token count. At a
    step boundary the finished step's mean is ``total / count``, read in O(1) instead of a pass over the keys."""

    total: dict  # layer -> (B, H_kv, D), compute dtype
    count: torch.Tensor  # (B,) float
    step: torch.Tensor  # (B,) long
    layers: list  # the layers that keep sums, in call order; the last one advances count and step


class SMIEdit(Edit):
    """SMI in ``resolved.smi_layers`` (and, read only, the bridge mass those layers give, for the flow monitor)."""

    def __init__(self, handle: InterventionHandle, config: StepFlowConfig, resolved: ResolvedStepFlow):
        self.handle, self.config, self.resolved = handle, config, resolved
        self.layers = resolved.smi_layers
        self.count: torch.Tensor | None = None  # (B,) injections (firing tokens; each applied in every SMI layer)
        self.norm: torch.Tensor | None = None  # (B,) sum over injections and layers of ||alpha * m|| (all heads)
        self.layer_calls: torch.Tensor | None = None  # (B,) injections x layers
        self._running: _Running | None = None

    def reset(self, labels) -> None:
        B, device = labels.segment.shape[0], labels.table.device
        self.count, self.norm, self.layer_calls = (torch.zeros(B, dtype=torch.float64, device=device)
                                                   for _ in range(3))
        mark_static(self.count, self.norm, self.layer_calls)
        self._running = None

    def acts(self, call: AttentionCall) -> bool:
        return call.layer_idx in self.layers and self.config.alpha > 0

    def fire_of(self, views: Views) -> torch.Tensor:
        """(B, Tq) the thinking step that ended where a query fires, -1 elsewhere (also the summary start when
        ``smi_at_summary``)."""
        if self.config.smi_at_summary:
            return torch.where(views.fire >= 0, views.fire, views.fire_summary)
        return views.fire

    def attend(self, call: AttentionCall, views: Views, out, weights):
        fire = self.fire_of(views)
        if self.handle.flow is not None:
            self._mass(call, views)
        if call.query.shape[2] == 1:
            return self._one(call, out, views, fire), weights
        if (self.handle.labeler is not None and self._uses_running_sums(call)
                and not torch.compiler.is_compiling()):
            self._rebuild_running(call, views, upto=views.q_pos[-1] + 1)  # decoding steps follow
        if not torch.compiler.is_compiling() and not bool((fire >= 0).any()):
            return out, weights
        return self.inject_many(call, out, fire, views.k_seg, views.k_step), weights

    # -- the flow monitor (read only) ------------------------------------------------------------------------
    def _mass(self, call: AttentionCall, v: Views) -> None:
        """The bridge mass this layer's own attention gives each editable query (SMI edits outputs, not weights)."""
        h = self.handle
        Tq, Tk = call.query.shape[2], call.key.shape[2]
        if Tq > 1 and not torch.compiler.is_compiling() and not bool(v.editable.any()):
            return
        q_offset = h.query_offset(Tq, Tk)
        H = call.query.shape[1]
        chunk = max(1, int(2**27 // max(1, call.query.shape[0] * H * Tk * 4)))
        fused = Tq == 1 and torch.compiler.is_compiling()
        for q0 in range(0, Tq, chunk):
            q1 = min(Tq, q0 + chunk)
            logits = logits_block(call, slice(None), q0, q1, 0, Tk, q_offset, fused)  # (B, H, c, Tk)
            log_norm = log_normaliser(call, logits)
            bridge = v.bridge[:, :, q0:q1]
            lse = torch.logsumexp(logits.masked_fill(~bridge, torch.finfo(logits.dtype).min), dim=-1)
            has = (torch.isfinite(logits) & bridge).any(-1)
            p_b = torch.where(has, torch.exp(lse - log_norm), torch.zeros_like(lse))
            ed = v.editable[:, :, q0:q1].expand(-1, H, -1)
            h.flow_add(v.q_pos[q0:q1], p_b, p_b, ed, smi=True)

    # -- decoding ---------------------------------------------------------------------------------------------
    def _uses_running_sums(self, call: AttentionCall) -> bool:
        """Full-attention layers averaging the whole step: a window (the layer's or ``smi_window``) hides older
        tokens, which a running sum cannot forget, so those layers average the visible keys instead."""
        return sliding_window_of(call) is None and self.config.smi_window is None

    def _one(self, call: AttentionCall, out, v: Views, fire_all):
        """One decoding token: tensor operations only (no host reads, no data-dependent shapes)."""
        layer = call.layer_idx
        labeler = self.handle.labeler
        fire = fire_all[:, 0]  # (B,)
        compiling = torch.compiler.is_compiling()
        # the running sums this layer reads and advances (None: it averages the visible keys instead)
        run: _Running | None = None
        if self._uses_running_sums(call):
            run = self._running
            if run is None or layer not in run.total:
                # decoding began without a multi-token call (a one-token prompt): average by a pass over the keys
                # this time, and start the sums from the keys, this token included
                if compiling:
                    raise StepscopeError("StepFlow's SMI sums start in an eager call: run the prefill uncompiled")
                out = self._inject(call, out, fire, self._scan_means(call, v, fire))
                self._rebuild_running(call, v, upto=v.q_pos[0] + 1)
                return out
        # Rows whose pending tokens were just settled: the sums folded them under provisional labels, so this
        # token's mean comes from a pass over the keys (their labels are final now) and the sums restart from them.
        # Eager decoding does this only when the host says some row resolves; a compiled step always, masked.
        resolve = None
        if run is not None and (compiling or labeler is None or labeler.resolving()):
            resolve = v.resolve[:, 0] > 0
        # Eager decoding may skip the injection when the host's labels say no row starts a step (no device read);
        # a compiled step always runs it, masked.
        if compiling or labeler is None or labeler.fired(self.config.smi_at_summary):
            if run is not None:
                scale = torch.where(run.step == fire, 1.0 / run.count.clamp_min(1), 0.0)  # empty step: 0
                m = run.total[layer] * scale.to(run.total[layer].dtype)[:, None, None]
                if resolve is not None:
                    m = torch.where(resolve[:, None, None], self._scan_means(call, v, fire).to(m.dtype), m)
            else:
                m = self._scan_means(call, v, fire)
            out = self._inject(call, out, fire, m)
        if run is not None:
            if resolve is not None:
                self._resync_running(call, run, v, resolve)
            self._advance_running(call, run, v)
        return out

    def _scan_means(self, call: AttentionCall, v: Views, fire):
        """Step means of every row by a pass over the call's keys (sliding-window layers, ``smi_window``)."""
        B = fire.shape[0]
        rows = torch.arange(B, device=fire.device)
        return step_means(compute_dtype(call.value), rows, torch.zeros_like(rows), fire, v.k_seg, v.k_step,
                          v.k_pos, v.q_pos.expand(B), self.config.smi_window, sliding_window_of(call))

    def _inject(self, call: AttentionCall, out, fire, m):
        """``out + alpha * m`` in the rows that fire (``m``: (B, H_kv, D) step means)."""
        fires = fire >= 0
        m = m.repeat_interleave(call.query.shape[1] // m.shape[1], dim=1)  # values after key/value-group expansion
        delta = (self.config.alpha * m).to(out.dtype)  # (B, H, D)
        out = torch.where(fires[:, None, None, None], out + delta[:, None], out)
        if self.norm is not None and self.layer_calls is not None and self.count is not None:
            f = fires.to(self.norm.dtype)
            self.norm += delta.flatten(1).norm(dim=-1).to(self.norm.dtype) * f
            self.layer_calls += f
            if call.layer_idx == min(self.layers):
                self.count += f
        return out

    def _advance_running(self, call: AttentionCall, run: _Running, v: Views) -> None:
        """Fold the current token's value into its step's sum, or start the sum of a new step; the last summing
        layer of the call then advances the shared step index and count."""
        slot = v.q_pos - v.k_pos[0]  # (1,) the query's own key slot
        total = run.total[call.layer_idx]
        cur = compute_dtype(call.value.index_select(2, slot)[:, :, 0])  # (B, H_kv, D)
        step = v.q_step[:, 0]
        think = v.q_seg[:, 0] == THINKING
        keep = (~think | (step == run.step)).to(total.dtype)  # 0 where a new step starts
        add = think.to(total.dtype)
        total.mul_(keep[:, None, None]).add_(cur * add[:, None, None])
        if call.layer_idx == run.layers[-1]:
            run.count.mul_(keep).add_(add)
            run.step.copy_(torch.where(think, step, run.step))

    @staticmethod
    def _step_sums(call: AttentionCall, v: Views, upto):
        """(value sum, token count, index) of the latest thinking step among key positions before ``upto``."""
        val = compute_dtype(call.value.detach())
        think = (v.k_seg == THINKING) & (v.k_pos < upto)[None, :]
        last = torch.where(think, v.k_step, -1).amax(-1)  # (B,)
        sel = (think & (v.k_step == last[:, None])).to(val.dtype)
        return torch.einsum("bk,bhkd->bhd", sel, val), sel.sum(-1), last

    def _resync_running(self, call: AttentionCall, run: _Running, v: Views, rows) -> None:
        """Restart the sums of ``rows`` (B,) bool from the keys before the current token; the shared count and
        index are the same in every summing layer, so each layer may write them."""
        total, count, last = self._step_sums(call, v, v.q_pos[0])
        cur = run.total[call.layer_idx]
        cur.copy_(torch.where(rows[:, None, None], total.to(cur.dtype), cur))
        run.count.copy_(torch.where(rows, count.to(run.count.dtype), run.count))
        run.step.copy_(torch.where(rows, last, run.step))

    def _rebuild_running(self, call: AttentionCall, v: Views, upto) -> None:
        """Running sums of the latest thinking step among key positions before ``upto`` (eager)."""
        total, count, last = self._step_sums(call, v, upto)
        run = self._running
        if run is None:
            run = self._running = _Running({}, count, last, [])
            mark_static(run.count, run.step)
        else:  # every summing layer sees the same labels: the shared index and count are the same
            run.count.copy_(count)
            run.step.copy_(last)
        if call.layer_idx not in run.total:
            run.layers.append(call.layer_idx)
        run.total[call.layer_idx] = total
        mark_static(total)

    # -- several queries at once --------------------------------------------------------------------------------
    def inject_many(self, call: AttentionCall, out, fire, k_seg, k_step):
        """Several queries at once (prefill, teacher-forced passes), eagerly: inject where steps start."""
        Tq, Tk = call.query.shape[2], call.key.shape[2]
        q_pos, k_pos = self.handle.bound_labels.positions(Tq, Tk)
        rows, pos = torch.nonzero(fire >= 0, as_tuple=True)
        m = step_means(compute_dtype(call.value), rows, pos, fire[rows, pos], k_seg, k_step, k_pos, q_pos[pos],
                       self.config.smi_window, sliding_window_of(call))  # (n, H_kv, D)
        H = call.query.shape[1]
        m = m.repeat_interleave(H // m.shape[1], dim=1)  # values after key/value-group expansion
        delta = (self.config.alpha * m).to(out.dtype)  # (n, H, D)
        out = out.clone()
        out[rows, pos] += delta
        if self.norm is not None and self.layer_calls is not None and self.count is not None:
            norms = delta.flatten(1).norm(dim=-1).to(self.norm.dtype)
            self.norm.index_add_(0, rows, norms)
            self.layer_calls.index_add_(0, rows, torch.ones_like(norms))
            if call.layer_idx == min(self.layers):
                self.count.index_add_(0, rows, torch.ones_like(norms))
        return out

    def row_stats(self) -> list[dict]:
        if self.count is None or self.norm is None or self.layer_calls is None:
            return []
        count, norm, calls = self.count.cpu(), self.norm.cpu(), self.layer_calls.cpu()
        return [{"smi_injections": int(count[b]),
                 "smi_mean_norm": float(norm[b]) / float(calls[b]) if float(calls[b]) else None}
                for b in range(count.shape[0])]
