"""The Odds-Equal Bridge as an edit of an installed intervention: the math of :mod:`.oeb` applied to a layer's
attention, while decoding and on teacher-forced passes, with its statistics and its Step-Saliency rebuild."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from ..attention.dispatch import AttentionCall
from ..attention.scores import compute_dtype, log_normaliser, logits_block, sliding_window_of
from ..labels import mark_static
from .config import ResolvedStepFlow, StepFlowConfig
from .intervention import Edit, WeightsEdit
from .oeb import groups, odds_equal_bridge

if TYPE_CHECKING:
    from .handle import InterventionHandle, Views


class OEBEdit(Edit):
    """OEB in ``resolved.oeb_layers``: each editable (head, query) pair's bridge mass lifted to ``tau_B``."""

    def __init__(self, handle: InterventionHandle, config: StepFlowConfig, resolved: ResolvedStepFlow):
        self.handle, self.config, self.resolved = handle, config, resolved
        self.layers = resolved.oeb_layers
        self.edits: torch.Tensor | None = None  # (B, L) edited (head, query) pairs per layer
        self.queries: torch.Tensor | None = None  # (B, L) editable (head, query) pairs seen
        self.before: torch.Tensor | None = None  # (B,) sum of p(B) over editable pairs
        self.after: torch.Tensor | None = None  # (B,)
        # default band, eager decoding: per row, layer -> decoding steps skipped (the window held no bridge key)
        self.skipped: list[dict[int, int]] = []
        self._skip_warned = False

    def reset(self, labels) -> None:
        B, L, device = labels.segment.shape[0], self.resolved.num_layers, labels.table.device
        self.edits, self.queries = (torch.zeros(B, L, dtype=torch.float64, device=device) for _ in range(2))
        self.before, self.after = (torch.zeros(B, dtype=torch.float64, device=device) for _ in range(2))
        mark_static(self.edits, self.queries, self.before, self.after)
        self.skipped = [{} for _ in range(B)]

    def acts(self, call: AttentionCall) -> bool:
        return call.layer_idx in self.layers and self.config.tau_max > 0 and not self._blind(call)

    def groups(self, views: Views) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bridge keys, current-segment keys and editable queries of a call (a control swaps the bridge)."""
        return views.bridge, views.current, views.editable

    def block_groups(self, labels, b: int, q0: int, q1: int, k0: int, k1: int):
        """The same for a block of a finished sequence, from the roles its queries acted as while generating."""
        return groups(labels.role[b : b + 1, q0:q1], labels.segment[b : b + 1, k0:k1])

    def attend(self, call: AttentionCall, views: Views, out, weights):
        editable = views.editable
        # Multi-token calls (prefill, teacher-forced passes) run eagerly, where skipping the prompt pays; a
        # one-token step runs the edit unconditionally (masked by where()), with no host read.
        if call.query.shape[2] > 1 and not torch.compiler.is_compiling() and not bool(editable.any()):
            return out, weights
        return self._edit(call, out, weights, views)

    def _blind(self, call: AttentionCall) -> bool:
        """Default OEB band, eager decoding: whether this sliding-window layer's window holds no bridge key of any
        row (the question for a thinking token, the thinking for a summary token), so that the layer is skipped.
        OEB edits only heads that see a bridge key, so skipping changes nothing but the work; it is counted per row
        and stated once. Layers given by hand are never skipped."""
        h = self.handle
        window = sliding_window_of(call)
        if (window is None or not self.resolved.oeb_default or h.labeler is None or call.query.shape[2] != 1
                or torch.compiler.is_compiling()):
            return False
        blind = h.labeler.bridge_out_of_window(window)
        if not all(blind):
            return False
        layer = call.layer_idx
        for b, row in enumerate(self.skipped):
            if h.labeler.active(b):
                row[layer] = row.get(layer, 0) + 1
        self._flow_blind(call)
        if not self._skip_warned:
            self._skip_warned = True
            slid = self.resolved.sliding(self.resolved.oeb_layers)
            warnings.warn(f"OEB skips its default band's sliding-window layers ({','.join(map(str, slid))}; "
                          f"window {window} tokens) at decoding steps where the window holds no bridge key (the "
                          "question, or the thinking for the summary): their edit would be empty there; see "
                          "oeb_skipped_steps in the StepFlow stats", stacklevel=2)
        return True

    def _flow_blind(self, call: AttentionCall) -> None:
        """A skipped sliding layer: its editable queries saw bridge mass 0 (no bridge key in the window)."""
        h = self.handle
        B, H, Tq, _ = call.query.shape
        Tk = call.key.shape[2]
        h.check_shapes(B, Tq, Tk)
        v = h.views(Tq, Tk)
        ed = v.editable.expand(-1, H, -1)
        zero = torch.zeros(ed.shape, dtype=torch.float64, device=ed.device)
        h.flow_add(v.q_pos, zero, zero, ed)

    def _edit(self, call: AttentionCall, base_out, base_weights, views: Views):
        bridge, current, editable = self.groups(views)
        Tq, Tk = call.query.shape[2], call.key.shape[2]
        q_offset = self.handle.query_offset(Tq, Tk)
        layer = call.layer_idx
        outs, weights = [], []
        chunk = max(1, int(2**27 // max(1, call.query.shape[0] * call.query.shape[1] * Tk * 4)))
        v = compute_dtype(call.value)
        fused = Tq == 1 and torch.compiler.is_compiling()  # one pass over keys and values in the cache's dtype
        for q0 in range(0, Tq, chunk):
            q1 = min(Tq, q0 + chunk)
            logits = logits_block(call, slice(None), q0, q1, 0, Tk, q_offset, fused)  # (B, H, c, Tk)
            log_norm = log_normaliser(call, logits)
            res = odds_equal_bridge(logits, log_norm, bridge[:, :, q0:q1], current[:, :, q0:q1],
                                    editable[:, :, q0:q1], self.config.tau_max, self.config.eps)
            self._record(layer, res, editable[:, :, q0:q1], views.q_pos[q0:q1])
            # No test of "was anything edited" here: reading it back would stall a GPU once per layer and token.
            # Rows that were not edited keep the model's own output (and weights) bit for bit through where().
            p = group_batched(res.probs, v.shape[1])  # (B, H_kv, n_rep * c, Tk)
            pv = (p[..., None] * v[:, :, None]).sum(-2) if fused else p @ v
            ours = ungroup_batched(pv, call.query.shape[1])  # (B, H, c, D)
            keep = res.edited[..., None]
            base = base_out[:, q0:q1].transpose(1, 2)
            outs.append(torch.where(keep, ours.to(base.dtype), base).transpose(1, 2))
            probs = res.probs.to(call.query.dtype)
            if base_weights is not None:
                probs = torch.where(keep, probs, base_weights[:, :, q0:q1])
            weights.append(probs)
        if len(outs) == 1:  # decoding: one chunk
            return outs[0].contiguous(), weights[0]
        return torch.cat(outs, dim=1).contiguous(), torch.cat(weights, dim=2)

    def _record(self, layer, res, editable, q_pos) -> None:
        if self.edits is None or self.queries is None or self.before is None or self.after is None:
            return
        ed = editable.expand_as(res.edited)
        self.handle.flow_add(q_pos, res.bridge_before, res.bridge_after, ed)
        self.edits[:, layer] += res.edited.sum(dim=(1, 2)).to(self.edits.dtype)
        self.queries[:, layer] += ed.sum(dim=(1, 2)).to(self.queries.dtype)
        self.before += (res.bridge_before * ed).sum(dim=(1, 2)).to(self.before.dtype)
        self.after += (res.bridge_after * ed).sum(dim=(1, 2)).to(self.after.dtype)

    def saliency_edit(self, layer: int) -> WeightsEdit | None:
        if layer not in self.layers or self.config.tau_max == 0:
            return None
        labels = self.handle.bound_labels
        tau_max, eps = self.config.tau_max, self.config.eps

        def edit(call: AttentionCall, b: int, q0: int, q1: int, k0: int, k1: int, logits: torch.Tensor):
            bridge, current, editable = self.block_groups(labels, b, q0, q1, k0, k1)
            res = odds_equal_bridge(logits[None], log_normaliser(call, logits)[None], bridge, current, editable,
                                    tau_max, eps)
            return res.probs[0]

        return edit

    def row_stats(self) -> list[dict]:
        if self.edits is None or self.queries is None or self.before is None or self.after is None:
            return []
        edits, seen = self.edits.cpu(), self.queries.cpu()
        before, after = self.before.cpu(), self.after.cpu()
        out = []
        for b in range(edits.shape[0]):
            n = float(seen[b].sum())
            row = {
                "oeb_edits_per_layer": {int(layer): int(edits[b, layer]) for layer in sorted(self.layers)},
                "oeb_edit_rate": float(edits[b].sum()) / n if n else None,
                "bridge_mass_before": float(before[b]) / n if n else None,
                "bridge_mass_after": float(after[b]) / n if n else None,
            }
            if self.skipped[b]:  # sliding layers of the default band, skipped where the window held no bridge key
                row["oeb_skipped_steps"] = {int(k): int(c) for k, c in sorted(self.skipped[b].items())}
            out.append(row)
        return out


def group_batched(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(B, H, c, k) -> (B, H_kv, n_rep * c, k)."""
    B, H, c, k = x.shape
    return x.reshape(B, n_kv, (H // n_kv) * c, k)


def ungroup_batched(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, n_kv, rc, d = x.shape
    return x.reshape(B, heads, rc // (heads // n_kv), d)
