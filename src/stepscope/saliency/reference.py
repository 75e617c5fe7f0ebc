"""Brute-force Step-Saliency: every layer's attention weights kept with retained gradients, dense pooling.

For tests and benchmarks only (memory grows with layers x heads x T x T). Without StepFlow it runs the model's
own eager attention. With StepFlow it runs a deliberately plain attention (explicit softmax, the OEB rule written
out per query, SMI added per step start) so that the engine's edited path is checked against independent code.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from ..attention.dispatch import install
from ..segments import Segment
from ..trace import Trace
from .engine import target_weights


def reference_sums(model, trace: Trace, target: str = "all", stepflow=None) -> tuple[np.ndarray, np.ndarray]:
    """(L, S, S) saliency sums and (L, S) sums into tokens in no step, computed the slow, obvious way."""
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    kept: dict[int, torch.Tensor] = {}
    try:
        ids = torch.tensor([trace.token_ids], device=next(model.parameters()).device)
        weights = target_weights([trace], len(trace), target, ids.device)[0]
        if stepflow is None:
            out = model(input_ids=ids, output_attentions=True, use_cache=False)
            attentions = list(out.attentions)
        else:
            handler = _PlainStepFlowAttention(trace, stepflow.resolve(model.config.num_hidden_layers), kept)
            with install(model, handler):
                out = model(input_ids=ids, use_cache=False)
            attentions = [kept[i] for i in range(len(kept))]
        for a in attentions:
            a.retain_grad()
        logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
        ce = -logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
        (ce * weights[:-1]).sum().backward()
        return _pool(trace, attentions)
    finally:
        model.zero_grad(set_to_none=True)
        model.set_attn_implementation(original)


def _pool(trace: Trace, attentions) -> tuple[np.ndarray, np.ndarray]:
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
    return sums, other


class _PlainStepFlowAttention:
    """Causal softmax attention with the SPEC's OEB and SMI applied literally, for one unpadded trace."""

    def __init__(self, trace: Trace, resolved, kept: dict):
        self.r, self.kept = resolved, kept
        seg = trace.segment_ids()  # final segmentation; the traces used with this reference have live == final
        self.seg = seg
        self.step = trace.step_ids()
        thinking = trace.steps_of("thinking")
        # step start position -> token positions of the step that just ended
        self.fire = {s.start: list(range(p.start, p.end)) for p, s in itertools.pairwise(thinking)}
        if resolved.config.smi_at_summary and thinking and trace.steps_of("summary"):
            last = thinking[-1]
            self.fire[trace.steps_of("summary")[0].start] = list(range(last.start, last.end))

    def __call__(self, call, proceed):
        module, q, k, v = call.module, call.query, call.key, call.value
        H, n_kv = q.shape[1], k.shape[1]
        k = k.repeat_interleave(H // n_kv, dim=1)
        v = v.repeat_interleave(H // n_kv, dim=1)
        T = q.shape[2]
        logits = (q @ k.transpose(-1, -2)) * call.scaling  # (1, H, T, T)
        allowed = torch.ones(T, T, dtype=torch.bool).tril()
        w = getattr(module, "sliding_window", None)
        if w:
            allowed &= ~torch.ones(T, T, dtype=torch.bool).tril(-w)
        logits = logits.masked_fill(~allowed, float("-inf"))
        if call.sinks is not None:
            sink = call.sinks.detach().view(1, H, 1, 1).expand(1, H, T, 1).to(logits.dtype)
            probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(logits, dim=-1)
        layer = call.layer_idx
        if layer in self.r.oeb_layers and self.r.config.tau_max > 0:
            probs = self._oeb(probs, allowed)
        self.kept[layer] = probs
        out = probs @ v  # (1, H, T, D)
        if layer in self.r.smi_layers and self.r.config.alpha > 0:
            add = torch.zeros_like(out)
            for t, prev in self.fire.items():
                toks = [p for p in prev if allowed[t, p]]
                if self.r.config.smi_window is not None:
                    toks = [p for p in toks if p >= t - self.r.config.smi_window]
                if toks:
                    add[0, :, t] = self.r.config.alpha * v[0, :, toks].mean(1)
            out = out + add
        return out.transpose(1, 2).contiguous(), probs

    def _oeb(self, probs, allowed):
        cfg = self.r.config
        rows = []
        for t in range(probs.shape[2]):
            p = probs[0, :, t]  # (H, T)
            qs = self.seg[t]
            if qs not in (Segment.THINKING, Segment.SUMMARY):
                rows.append(p)
                continue
            vis = allowed[t].numpy()
            bridge = vis & (self.seg == (Segment.QUESTION if qs == Segment.THINKING else Segment.THINKING))
            current = vis & (self.seg == qs)
            nb, ns = int(bridge.sum()), int(current.sum())
            if nb == 0:
                rows.append(p)
                continue
            b_t, c_t = torch.from_numpy(bridge), torch.from_numpy(current)
            new = []
            for h in range(p.shape[0]):
                ph = p[h]
                pB, pS = ph[b_t].sum(), ph[c_t].sum()
                pO = 1 - pB - pS
                tau_b = min(math.sqrt(nb / (nb + ns)), cfg.tau_max)
                tau_b = min(tau_b, float(1 - pO - cfg.eps))
                if float(pB) < tau_b and float(pS) > cfg.eps:
                    tau_s = 1 - pO - tau_b
                    scale = torch.where(b_t, tau_b / pB, torch.where(c_t, tau_s / pS, torch.ones_like(pB)))
                    new.append(ph * scale)
                else:
                    new.append(ph)
            rows.append(torch.stack(new))
        return torch.stack(rows, dim=1)[None]  # (1, H, T, T)
