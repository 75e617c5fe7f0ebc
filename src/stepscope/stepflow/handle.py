"""Installing StepFlow on a model: an attention handler (via the AttentionInterface dispatcher) plus a
pre-forward hook that keeps each row's segment/step labels current. A handle with ``remove()`` and a context
manager undo both exactly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..attention.dispatch import AttentionCall, InstallHandle, install
from ..attention.scores import compute_dtype, log_normaliser, logits_block, sliding_window_of
from ..errors import StepscopeError
from ..labels import BatchLabels, RowLabeler
from ..profiles import get_profile
from .config import ResolvedStepFlow, StepFlowConfig
from .oeb import groups, odds_equal_bridge
from .smi import step_means


@dataclass
class StepFlowStats:
    """Per-row running totals (device tensors, so that decoding never waits on them)."""

    oeb_edits: torch.Tensor  # (B, L) edited (head, query) pairs per layer
    oeb_queries: torch.Tensor  # (B, L) editable (head, query) pairs seen
    bridge_before: torch.Tensor  # (B,) sum of p(B) over editable pairs
    bridge_after: torch.Tensor  # (B,)
    smi_count: torch.Tensor  # (B,) injections (firing tokens; each is applied in every SMI layer)
    smi_norm: torch.Tensor  # (B,) sum over injections and layers of ||alpha * m|| (all heads)
    smi_layer_calls: torch.Tensor  # (B,) injections x layers

    @classmethod
    def zeros(cls, batch: int, layers: int, device) -> "StepFlowStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(batch, layers), z(batch, layers), z(batch), z(batch), z(batch), z(batch), z(batch))

    def rows(self, resolved: ResolvedStepFlow) -> list[dict]:
        edits, seen = self.oeb_edits.cpu(), self.oeb_queries.cpu()
        out = []
        for b in range(edits.shape[0]):
            n = float(seen[b].sum())
            calls = float(self.smi_layer_calls[b])
            out.append({
                "oeb_edits_per_layer": {int(l): int(edits[b, l]) for l in sorted(resolved.oeb_layers)},
                "oeb_edit_rate": float(edits[b].sum()) / n if n else None,
                "bridge_mass_before": float(self.bridge_before[b]) / n if n else None,
                "bridge_mass_after": float(self.bridge_after[b]) / n if n else None,
                "smi_injections": int(self.smi_count[b]),
                "smi_mean_norm": float(self.smi_norm[b]) / calls if calls else None,
            })
        return out


@dataclass(frozen=True)
class _Views:
    k_seg: torch.Tensor
    k_step: torch.Tensor
    fire: torch.Tensor  # (B, Tq) index of the thinking step that just ended, -1 where SMI does not fire
    any_fire: bool
    bridge: torch.Tensor
    current: torch.Tensor
    editable: torch.Tensor
    any_editable: bool


@dataclass
class StepFlowHandle:
    """StepFlow installed on a model. ``remove()`` (or leaving the ``with`` block) restores the model."""

    model: torch.nn.Module
    tokenizer: object
    config: StepFlowConfig
    resolved: ResolvedStepFlow
    labels: BatchLabels | None = None
    labeler: RowLabeler | None = None
    stats: StepFlowStats | None = None
    _auto: bool = True  # track tokens from the forward inputs (model.generate); False when a caller binds labels
    _install: InstallHandle | None = None
    _hook: object = None
    _removed: bool = field(default=False)
    _cache_key: tuple | None = None
    _cache: object = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        try:
            if self._hook is not None:
                self._hook.remove()
        finally:
            if self._install is not None:
                self._install.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def bind(self, labeler: RowLabeler) -> None:
        """Use labels a caller maintains (our own generation loop pushes tokens itself)."""
        self.labeler, self.labels, self._auto = labeler, labeler.labels, False
        self.stats = StepFlowStats.zeros(len(labeler.prompts), self.resolved.num_layers, _device(self.model))

    def bind_labels(self, labels: BatchLabels) -> None:
        """Fixed labels for a teacher-forced pass over finished sequences."""
        self.labeler, self.labels, self._auto = None, labels, False
        self.stats = StepFlowStats.zeros(labels.segment.shape[0], self.resolved.num_layers, _device(self.model))

    def row_stats(self) -> list[dict]:
        return [] if self.stats is None else self.stats.rows(self.resolved)

    # -- the forward pre-hook (auto mode: plain model.generate / model(...) calls) ----------------------------
    def _pre_forward(self, module, args, kwargs):
        if not self._auto:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise StepscopeError("StepFlow needs input_ids to track reasoning steps (inputs_embeds alone is not "
                                 "supported)")
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if past == 0 or self.labeler is None:
            rows = []
            for b in range(ids.shape[0]):
                row = ids[b] if mask is None else ids[b][mask[b, -ids.shape[1]:].bool()]
                rows.append(row.tolist())
            self.labeler = RowLabeler(self.tokenizer, get_profile(None, self.tokenizer), rows, ids.device,
                                      sink_tokens=self.config.sink_tokens)
            self.labels = self.labeler.labels
            self.stats = StepFlowStats.zeros(ids.shape[0], self.resolved.num_layers, ids.device)
        else:
            if ids.shape[1] != 1:
                raise StepscopeError("StepFlow tracks one new token per decoding step; multi-token decoding "
                                     "(assisted/speculative generation) is not supported")
            self.labeler.push([int(t) for t in ids[:, 0].tolist()])
        return None

    # -- the attention handler -----------------------------------------------------------------------------
    def _views(self, Tq: int, Tk: int) -> "_Views":
        """Label views of the current forward call, computed once and shared by every layer of that call."""
        key = (id(self.labels), self.labels.length, Tq, Tk)
        if self._cache_key != key:
            (q_seg, _, q_fire, q_fsum), (k_seg, k_step) = self.labels.window(Tq, Tk)
            fire = torch.where(q_fire >= 0, q_fire, q_fsum) if self.config.smi_at_summary else q_fire
            bridge, current, editable = groups(q_seg, k_seg)
            self._cache = _Views(k_seg, k_step, fire, bool((fire >= 0).any()), bridge, current, editable,
                                 bool(editable.any()))
            self._cache_key = key
        return self._cache

    def __call__(self, call: AttentionCall, proceed):
        layer = call.layer_idx
        in_oeb, in_smi = layer in self.resolved.oeb_layers, layer in self.resolved.smi_layers
        if self.labels is None or not (in_oeb or in_smi):
            return proceed(call)
        B, H, Tq, _ = call.query.shape
        Tk = call.key.shape[2]
        if self.labels.segment.shape[0] != B or self.labels.length < Tk:
            raise StepscopeError(
                f"StepFlow labels cover {self.labels.segment.shape[0]} rows x {self.labels.length} positions but the "
                f"model attends with {B} rows x {Tk} keys; call generate() through stepscope or bind labels"
            )
        v = self._views(Tq, Tk)
        out, weights = proceed(call)
        if in_oeb and self.config.tau_max > 0 and v.any_editable:
            out, weights = self._oeb(call, out, weights, v)
        if in_smi and self.config.alpha > 0 and v.any_fire:
            out = self._smi(call, out, v.fire, v.k_seg, v.k_step)
        return out, weights

    def _oeb(self, call, base_out, base_weights, views: "_Views"):
        bridge, current, editable = views.bridge, views.current, views.editable
        Tq, Tk = call.query.shape[2], call.key.shape[2]
        q_offset = Tk - Tq
        layer = call.layer_idx
        outs, weights = [], []
        chunk = max(1, int(2**27 // max(1, call.query.shape[0] * call.query.shape[1] * Tk * 4)))
        v = compute_dtype(call.value)
        for q0 in range(0, Tq, chunk):
            q1 = min(Tq, q0 + chunk)
            logits = logits_block(call, slice(None), q0, q1, 0, Tk, q_offset)  # (B, H, c, Tk)
            log_norm = log_normaliser(call, logits)
            res = odds_equal_bridge(logits, log_norm, bridge[:, :, q0:q1], current[:, :, q0:q1],
                                    editable[:, :, q0:q1], self.config.tau_max, self.config.eps)
            self._record_oeb(layer, res, editable[:, :, q0:q1])
            # No test of "was anything edited" here: reading it back would stall a GPU once per layer and token.
            # Rows that were not edited keep the model's own output (and weights) bit for bit through where().
            ours = ungroup_batched(group_batched(res.probs, v.shape[1]) @ v, call.query.shape[1])  # (B,H,c,D)
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

    def _record_oeb(self, layer, res, editable):
        if self.stats is None:
            return
        ed = editable.expand_as(res.edited)
        st = self.stats
        st.oeb_edits[:, layer] += res.edited.sum(dim=(1, 2)).to(st.oeb_edits.dtype)
        st.oeb_queries[:, layer] += ed.sum(dim=(1, 2)).to(st.oeb_queries.dtype)
        st.bridge_before += (res.bridge_before * ed).sum(dim=(1, 2)).to(st.bridge_before.dtype)
        st.bridge_after += (res.bridge_after * ed).sum(dim=(1, 2)).to(st.bridge_after.dtype)

    def _smi(self, call, out, fire, k_seg, k_step):
        Tq, Tk = call.query.shape[2], call.key.shape[2]
        L = self.labels.length
        rows, pos = torch.nonzero(fire >= 0, as_tuple=True)
        k_pos = torch.arange(L - Tk, L, device=fire.device)
        q_abs = (L - Tq) + pos
        m = step_means(compute_dtype(call.value), rows, pos, fire[rows, pos], k_seg, k_step, k_pos, q_abs,
                       self.config.smi_window, sliding_window_of(call))  # (n, H_kv, D)
        H = call.query.shape[1]
        m = m.repeat_interleave(H // m.shape[1], dim=1)  # values after key/value-group expansion
        delta = (self.config.alpha * m).to(out.dtype)  # (n, H, D)
        out = out.clone()
        out[rows, pos] += delta
        if self.stats is not None:
            st = self.stats
            norms = delta.flatten(1).norm(dim=-1).to(st.smi_norm.dtype)
            st.smi_norm.index_add_(0, rows, norms)
            st.smi_layer_calls.index_add_(0, rows, torch.ones_like(norms))
            if call.layer_idx == min(self.resolved.smi_layers):
                st.smi_count.index_add_(0, rows, torch.ones_like(norms))
        return out


def group_batched(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(B, H, c, k) -> (B, H_kv, n_rep * c, k)."""
    B, H, c, k = x.shape
    return x.reshape(B, n_kv, (H // n_kv) * c, k)


def ungroup_batched(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, n_kv, rc, d = x.shape
    return x.reshape(B, heads, rc // (heads // n_kv), d)


def _device(model):
    return next(model.parameters()).device


def apply(model, tokenizer, config: StepFlowConfig | None = None) -> StepFlowHandle:
    """Install StepFlow on ``model``; returns a handle (``remove()``; also a context manager)."""
    config = config or StepFlowConfig()
    resolved = config.resolve(model.config.num_hidden_layers)
    handle = StepFlowHandle(model, tokenizer, config, resolved)
    handle._install = install(model, handle)
    try:
        handle._hook = model.register_forward_pre_hook(handle._pre_forward, with_kwargs=True)
    except Exception:
        handle._install.remove()
        raise
    return handle


@contextlib.contextmanager
def stepflow_session(model, tokenizer, config: StepFlowConfig, labeler: RowLabeler):
    """StepFlow for one batch of our own generation loop, reading the labels it pushes."""
    handle = apply(model, tokenizer, config)
    try:
        handle.bind(labeler)
        yield handle
    finally:
        handle.remove()


def enabled(model, tokenizer, config: StepFlowConfig | None = None) -> StepFlowHandle:
    """``with stepscope.enabled(model, tokenizer, config): model.generate(...)``."""
    return apply(model, tokenizer, config)
