"""Installing StepFlow on a model: an attention handler (via the AttentionInterface dispatcher) plus a
pre-forward hook that keeps each row's segment/step labels current. A handle with ``remove()`` and a context
manager undo both exactly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.hooks import RemovableHandle

from ..attention.dispatch import AttentionCall, InstallHandle, install, interface_layers, require_interface
from ..attention.scores import (
    compute_dtype,
    log_normaliser,
    logits_block,
    sliding_window_of,
)
from ..errors import StepscopeError
from ..labels import THINKING, BatchLabels, RowLabeler, mark_static
from ..profiles import get_profile
from ..windows import layer_windows
from . import monitor as flow_monitor
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
    def zeros(cls, batch: int, layers: int, device) -> StepFlowStats:
        def z(*s: int) -> torch.Tensor:
            return torch.zeros(*s, dtype=torch.float64, device=device)

        out = cls(z(batch, layers), z(batch, layers), z(batch), z(batch), z(batch), z(batch), z(batch))
        mark_static(*vars(out).values())
        return out

    def rows(self, resolved: ResolvedStepFlow) -> list[dict]:
        edits, seen = self.oeb_edits.cpu(), self.oeb_queries.cpu()
        out = []
        for b in range(edits.shape[0]):
            n = float(seen[b].sum())
            calls = float(self.smi_layer_calls[b])
            out.append({
                "oeb_edits_per_layer": {int(layer): int(edits[b, layer]) for layer in sorted(resolved.oeb_layers)},
                "oeb_edit_rate": float(edits[b].sum()) / n if n else None,
                "bridge_mass_before": float(self.bridge_before[b]) / n if n else None,
                "bridge_mass_after": float(self.bridge_after[b]) / n if n else None,
                "smi_injections": int(self.smi_count[b]),
                "smi_mean_norm": float(self.smi_norm[b]) / calls if calls else None,
            })
        return out


@dataclass(frozen=True)
class _Views:
    """Labels of one attention call's queries and keys (shared by every layer of a forward call)."""

    q_pos: torch.Tensor  # (Tq,) absolute positions of the queries
    k_pos: torch.Tensor  # (Tk,) absolute positions of the key slots
    q_seg: torch.Tensor  # (B, Tq) the role each query acts as (OTHER while pending with its segment open)
    q_step: torch.Tensor  # (B, Tq)
    k_seg: torch.Tensor  # (B, Tk)
    k_step: torch.Tensor  # (B, Tk)
    fire: torch.Tensor  # (B, Tq) index of the thinking step that just ended, -1 where SMI does not fire
    resolve: torch.Tensor  # (B, Tq) 1 at the first certain token after pending ones
    bridge: torch.Tensor
    current: torch.Tensor
    editable: torch.Tensor


@dataclass
class _Running:
    """SMI running sums: per full-attention layer, the value sum of the thinking step being written; shared by
    those layers (they see the same tokens), its index (-1 before the first thinking token) and token count. At a
    step boundary the finished step's mean is ``total / count``, read in O(1) instead of a pass over the keys."""

    total: dict  # layer -> (B, H_kv, D), compute dtype
    count: torch.Tensor  # (B,) float
    step: torch.Tensor  # (B,) long
    layers: list  # the layers that keep sums, in call order; the last one advances count and step


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
    _hook: RemovableHandle | None = None
    _removed: bool = field(default=False)
    _memo_key: tuple | None = None
    _memo: dict = field(default_factory=dict)
    _running: _Running | None = None
    # default OEB band, eager decoding: per row, layer -> decoding steps skipped (window held no bridge key)
    oeb_skipped: list = field(default_factory=list)
    _skip_warned: bool = False
    # the flow monitor: per position, sums over (layer, head) of the bridge mass (planes: monitor.PLANES)
    flow: torch.Tensor | None = None
    _stream: Callable[[int, flow_monitor.FlowStep], None] | None = None
    _emitted: list = field(default_factory=list)

    # -- the bound state (set by bind(), bind_labels() or a tracked forward call) -------------------------------
    @property
    def bound_labels(self) -> BatchLabels:
        """The labels StepFlow acts on; an error while none are bound."""
        labels = self.labels
        if labels is None:
            raise StepscopeError("StepFlow has no labels bound: run the model (or generate) with StepFlow applied, "
                                 "or call bind() / bind_labels() first")
        return labels

    @property
    def _bound_labeler(self) -> RowLabeler:
        """The labeler of a bound generation (bind() or a tracked model.generate); an error otherwise."""
        labeler = self.labeler
        if labeler is None:
            raise StepscopeError("StepFlow has no row labeler bound: it exists only while StepFlow tracks a "
                                 "generation (bind() or a model.generate call)")
        return labeler

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
        self._reset(labeler, labeler.labels)
        self._auto = False
        self._stream = flow_monitor.current_stream()
        if self._stream is not None:
            self._emitted = [set() for _ in labeler.prompts]
            labeler.listeners.append(self._on_push)

    def bind_labels(self, labels: BatchLabels) -> None:
        """Fixed labels for a teacher-forced pass over finished sequences."""
        self._reset(None, labels)
        self._auto = False

    def _reset(self, labeler: RowLabeler | None, labels: BatchLabels) -> None:
        self.labeler, self.labels = labeler, labels
        self.stats = StepFlowStats.zeros(labels.segment.shape[0], self.resolved.num_layers, labels.table.device)
        self._memo_key, self._memo, self._running = None, {}, None
        self.oeb_skipped = [{} for _ in range(labels.segment.shape[0])]
        self.flow = torch.zeros(len(flow_monitor.PLANES), labels.segment.shape[0], labels.capacity,
                                dtype=torch.float64, device=labels.table.device)
        mark_static(self.flow)

    def row_stats(self) -> list[dict]:
        rows = [] if self.stats is None else self.stats.rows(self.resolved)
        for row, skipped in zip(rows, self.oeb_skipped):
            if skipped:  # sliding layers of the default OEB band, skipped where their window held no bridge key
                row["oeb_skipped_steps"] = {int(k): int(n) for k, n in sorted(skipped.items())}
        return rows

    # -- the forward pre-hook (auto mode: plain model.generate / model(...) calls) ----------------------------
    def _pre_forward(self, module, args, kwargs):
        if self._auto:
            self._track(args, kwargs)

    @torch.compiler.disable  # host work on decoded text; a compiled forward runs it eagerly, before its graph
    def _track(self, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise StepscopeError("StepFlow needs input_ids to track reasoning steps (inputs_embeds alone is not "
                                 "supported)")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if int(past) == 0 or self.labeler is None:
            real = _real_tokens(ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))
            rows = [ids[b][real[b]].tolist() for b in range(ids.shape[0])]
            # a static cache hands attention all its slots: size the labels to it up front
            labeler = RowLabeler(self.tokenizer, get_profile(None, self.tokenizer), rows, ids.device,
                                 capacity=_cache_capacity(cache), sink_tokens=self.config.sink_tokens)
            self._reset(labeler, labeler.labels)
        else:
            if ids.shape[1] != 1:
                raise StepscopeError("StepFlow tracks one new token per decoding step; multi-token decoding "
                                     "(assisted/speculative generation) is not supported")
            self.labeler.push([int(t) for t in ids[:, 0].tolist()])

    # -- the attention handler -----------------------------------------------------------------------------
    def _views(self, Tq: int, Tk: int) -> _Views:
        """Label views of the current call. Eager calls share them across the layers of one forward call; a
        compiled step rebuilds them per layer from tensors alone (the compiler merges the repeats)."""
        if torch.compiler.is_compiling():
            return self._build_views(Tq, Tk)
        labels = self.bound_labels
        key = (id(labels), labels.length)
        if self._memo_key != key:
            self._memo_key, self._memo = key, {}
        if (Tq, Tk) not in self._memo:  # sliding-window and full layers see different key spans
            self._memo[(Tq, Tk)] = self._build_views(Tq, Tk)
        return self._memo[(Tq, Tk)]

    def _build_views(self, Tq: int, Tk: int) -> _Views:
        labels = self.bound_labels
        q_pos, k_pos = labels.positions(Tq, Tk)
        _, q_step, q_fire, q_fsum, q_seg, q_resolve = labels.columns(q_pos).unbind(0)
        k_seg, k_step = labels.columns(k_pos)[:2].unbind(0)
        fire = torch.where(q_fire >= 0, q_fire, q_fsum) if self.config.smi_at_summary else q_fire
        bridge, current, editable = groups(q_seg, k_seg)
        return _Views(q_pos, k_pos, q_seg, q_step, k_seg, k_step, fire, q_resolve, bridge, current, editable)

    def _check(self, B: int, Tq: int, Tk: int) -> None:
        labels = self.bound_labels
        if labels.segment.shape[0] != B:
            raise StepscopeError(f"StepFlow labels cover {labels.segment.shape[0]} rows but the model attends with "
                                 f"{B} rows; call generate() through stepscope or bind labels")
        if torch.compiler.is_compiling():  # shapes only: the length lives on the device
            if labels.capacity < Tk:
                raise StepscopeError(f"StepFlow labels hold {labels.capacity} positions but the cache hands "
                                     f"attention {Tk} keys; size the labels to the cache before compiling")
            return
        if labels.length < Tq:
            raise StepscopeError(f"StepFlow labels cover {labels.length} positions but the model attends with "
                                 f"{Tq} new queries; call generate() through stepscope or bind labels")
        labels.ensure(max(labels.length, Tk))  # a static cache's slots past the length read as OTHER

    def __call__(self, call: AttentionCall, proceed):
        layer = call.layer_idx
        in_oeb = layer in self.resolved.oeb_layers and self.config.tau_max > 0
        in_smi = layer in self.resolved.smi_layers and self.config.alpha > 0
        if in_oeb and self.labels is not None and self._oeb_blind(call):
            in_oeb = False
        if self.labels is None or not (in_oeb or in_smi):
            return proceed(call)
        B, _, Tq, _ = call.query.shape
        Tk = call.key.shape[2]
        self._check(B, Tq, Tk)
        v = self._views(Tq, Tk)
        out, weights = proceed(call)
        # A one-token step runs the edits unconditionally (masked by where()): testing "is anything editable"
        # would read a tensor back to the host, a synchronisation per layer and a graph break when compiled.
        # Multi-token calls (prefill, teacher-forced passes) run eagerly, where skipping the prompt pays.
        eager_many = Tq > 1 and not torch.compiler.is_compiling()
        if in_oeb and not (eager_many and not bool(v.editable.any())):
            out, weights = self._oeb(call, out, weights, v)
        if in_smi and self.flow is not None:
            self._smi_mass(call, v)
        if in_smi and Tq == 1:
            out = self._smi_one(call, out, v)
        elif in_smi:
            if self.labeler is not None and self._uses_running_sums(call) and not torch.compiler.is_compiling():
                self._rebuild_running(call, v, upto=v.q_pos[-1] + 1)  # decoding steps follow
            if not (eager_many and not bool((v.fire >= 0).any())):
                out = self._smi(call, out, v.fire, v.k_seg, v.k_step)
        return out, weights

    def _oeb_blind(self, call) -> bool:
        """Default OEB band, eager decoding: whether this sliding-window layer's window holds no bridge key of any
        row (the question for a thinking token, the thinking for a summary token), so that the layer is skipped.
        OEB edits only heads that see a bridge key, so skipping changes nothing but the work; it is counted per row
        and stated once. Layers given by hand are never skipped."""
        window = sliding_window_of(call)
        if (window is None or not self.resolved.oeb_default or self.labeler is None or call.query.shape[2] != 1
                or torch.compiler.is_compiling()):
            return False
        blind = self.labeler.bridge_out_of_window(window)
        if not all(blind):
            return False
        layer = call.layer_idx
        for b, row in enumerate(self.oeb_skipped):
            if self.labeler.active(b):
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

    def _query_offset(self, Tq: int, Tk: int) -> int:
        """Key slot of the first query, for rebuilding a mask the kernel applied implicitly (no 4D mask)."""
        if torch.compiler.is_compiling():
            # compiled static-cache steps always carry a 4D mask; without one a single query sees every key
            return Tk - Tq
        L = self.bound_labels.length
        return L - Tq - max(L - Tk, 0)

    def _oeb(self, call, base_out, base_weights, views: _Views):
        bridge, current, editable = views.bridge, views.current, views.editable
        Tq, Tk = call.query.shape[2], call.key.shape[2]
        q_offset = self._query_offset(Tq, Tk)
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
            self._record_oeb(layer, res, editable[:, :, q0:q1], views.q_pos[q0:q1])
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

    # -- the flow monitor ------------------------------------------------------------------------------------
    def _flow_add(self, q_pos, before, after, ed, smi: bool = False) -> None:
        """Add (B, H, c) bridge masses of editable (head, query) pairs at positions ``q_pos`` (c,)."""
        flow = self.flow
        if flow is None:
            return
        capacity = self.bound_labels.capacity
        if flow.shape[2] < capacity:  # eager: the labels grew
            more = flow.new_zeros(flow.shape[0], flow.shape[1], capacity - flow.shape[2])
            flow = self.flow = torch.cat([flow, more], dim=2)
        w = ed.to(flow.dtype)
        n = w.sum(1)
        if smi:
            flow[3].index_add_(1, q_pos, (before.to(flow.dtype) * w).sum(1))
            flow[4].index_add_(1, q_pos, n)
        else:
            flow[0].index_add_(1, q_pos, (before.to(flow.dtype) * w).sum(1))
            flow[1].index_add_(1, q_pos, (after.to(flow.dtype) * w).sum(1))
            flow[2].index_add_(1, q_pos, n)

    def _smi_mass(self, call, v: _Views) -> None:
        """The bridge mass this layer's own attention gives each editable query (read only; SMI edits outputs)."""
        Tq, Tk = call.query.shape[2], call.key.shape[2]
        if Tq > 1 and not torch.compiler.is_compiling() and not bool(v.editable.any()):
            return
        q_offset = self._query_offset(Tq, Tk)
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
            self._flow_add(v.q_pos[q0:q1], p_b, p_b, ed, smi=True)

    def _flow_blind(self, call) -> None:
        """A skipped sliding layer: its editable queries saw bridge mass 0 (no bridge key in the window)."""
        B, H, Tq, _ = call.query.shape
        Tk = call.key.shape[2]
        self._check(B, Tq, Tk)
        v = self._views(Tq, Tk)
        ed = v.editable.expand(-1, H, -1)
        zero = torch.zeros(ed.shape, dtype=torch.float64, device=ed.device)
        self._flow_add(v.q_pos, zero, zero, ed)

    def flow_tokens(self) -> list:
        """Per row, the (len(PLANES), T) numpy sums at the positions of its own sequence (padding dropped)."""
        if self.flow is None or self.labeler is None:
            return []
        host = self.flow[:, :, : self.bound_labels.length].cpu().numpy()
        width = self.labeler._width
        return [host[:, b, width - len(p):] for b, p in enumerate(self.labeler.prompts)]

    def _on_push(self, labels) -> None:
        """Streaming: a row whose pushed token reports the end of a thinking step gets that step's line."""
        for b, lab in enumerate(labels):
            if lab is None:
                continue
            ended = lab.fire if lab.fire >= 0 else lab.fire_summary
            if ended >= 0:
                self._emit(b, ended)

    def _emit(self, b: int, step: int) -> None:
        if step in self._emitted[b]:
            return
        self._emitted[b].add(step)
        labels, labeler, flow, stream = self.bound_labels, self._bound_labeler, self.flow, self._stream
        if flow is None or stream is None:
            raise StepscopeError("StepFlow streams flow lines only while bound to a generation with a flow stream")
        L = labels.length
        cols = (labels.segment[b, :L] == THINKING) & (labels.step[b, :L] == step)
        idx = torch.nonzero(cols)[:, 0]
        if idx.numel() == 0:
            return
        sums = (flow[:, b, :L] * cols.to(flow.dtype)).sum(-1).cpu().numpy()
        pad = labeler._width - len(labeler.prompts[b])
        stream(b, flow_monitor.FlowStep.from_sums(step + 1, int(idx[0]) - pad, int(idx[-1]) + 1 - pad, sums))

    def flush_stream(self) -> None:
        """Streaming: the lines of each row's last thinking step, which no later step start reported."""
        labels = self.labels
        if self._stream is None or labels is None:
            return
        L = labels.length
        for b in range(labels.segment.shape[0]):
            think = labels.segment[b, :L] == THINKING
            if bool(think.any()):
                self._emit(b, int(labels.step[b, :L][think].max()))

    def _record_oeb(self, layer, res, editable, q_pos=None):
        if self.stats is None:
            return
        ed = editable.expand_as(res.edited)
        if q_pos is not None:
            self._flow_add(q_pos, res.bridge_before, res.bridge_after, ed)
        st = self.stats
        st.oeb_edits[:, layer] += res.edited.sum(dim=(1, 2)).to(st.oeb_edits.dtype)
        st.oeb_queries[:, layer] += ed.sum(dim=(1, 2)).to(st.oeb_queries.dtype)
        st.bridge_before += (res.bridge_before * ed).sum(dim=(1, 2)).to(st.bridge_before.dtype)
        st.bridge_after += (res.bridge_after * ed).sum(dim=(1, 2)).to(st.bridge_after.dtype)

    # -- SMI ------------------------------------------------------------------------------------------------
    def _uses_running_sums(self, call) -> bool:
        """Full-attention layers averaging the whole step: a window (the layer's or ``smi_window``) hides older
        tokens, which a running sum cannot forget, so those layers average the visible keys instead."""
        return sliding_window_of(call) is None and self.config.smi_window is None

    def _smi_one(self, call, out, v: _Views):
        """One decoding token: tensor operations only (no host reads, no data-dependent shapes)."""
        layer = call.layer_idx
        fire = v.fire[:, 0]  # (B,)
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
        if run is not None and (compiling or self.labeler is None or self.labeler.resolving()):
            resolve = v.resolve[:, 0] > 0
        # Eager decoding may skip the injection when the host's labels say no row starts a step (no device read);
        # a compiled step always runs it, masked.
        if compiling or self.labeler is None or self.labeler.fired(self.config.smi_at_summary):
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

    def _scan_means(self, call, v: _Views, fire):
        """Step means of every row by a pass over the call's keys (sliding-window layers, ``smi_window``)."""
        B = fire.shape[0]
        rows = torch.arange(B, device=fire.device)
        return step_means(compute_dtype(call.value), rows, torch.zeros_like(rows), fire, v.k_seg, v.k_step,
                          v.k_pos, v.q_pos.expand(B), self.config.smi_window, sliding_window_of(call))

    def _inject(self, call, out, fire, m):
        """``out + alpha * m`` in the rows that fire (``m``: (B, H_kv, D) step means)."""
        fires = fire >= 0
        m = m.repeat_interleave(call.query.shape[1] // m.shape[1], dim=1)  # values after key/value-group expansion
        delta = (self.config.alpha * m).to(out.dtype)  # (B, H, D)
        out = torch.where(fires[:, None, None, None], out + delta[:, None], out)
        if self.stats is not None:
            st = self.stats
            f = fires.to(st.smi_norm.dtype)
            st.smi_norm += delta.flatten(1).norm(dim=-1).to(st.smi_norm.dtype) * f
            st.smi_layer_calls += f
            if call.layer_idx == min(self.resolved.smi_layers):
                st.smi_count += f
        return out

    def _advance_running(self, call, run: _Running, v: _Views) -> None:
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
    def _step_sums(call, v: _Views, upto):
        """(value sum, token count, index) of the latest thinking step among key positions before ``upto``."""
        val = compute_dtype(call.value.detach())
        think = (v.k_seg == THINKING) & (v.k_pos < upto)[None, :]
        last = torch.where(think, v.k_step, -1).amax(-1)  # (B,)
        sel = (think & (v.k_step == last[:, None])).to(val.dtype)
        return torch.einsum("bk,bhkd->bhd", sel, val), sel.sum(-1), last

    def _resync_running(self, call, run: _Running, v: _Views, rows) -> None:
        """Restart the sums of ``rows`` (B,) bool from the keys before the current token; the shared count and
        index are the same in every summing layer, so each layer may write them."""
        total, count, last = self._step_sums(call, v, v.q_pos[0])
        cur = run.total[call.layer_idx]
        cur.copy_(torch.where(rows[:, None, None], total.to(cur.dtype), cur))
        run.count.copy_(torch.where(rows, count.to(run.count.dtype), run.count))
        run.step.copy_(torch.where(rows, last, run.step))

    def _rebuild_running(self, call, v: _Views, upto) -> None:
        """Running sums of the latest thinking step among key positions before ``upto`` (eager)."""
        total, count, last = self._step_sums(call, v, upto)
        sel_count = count
        run = self._running
        if run is None:
            run = self._running = _Running({}, sel_count, last, [])
            mark_static(run.count, run.step)
        else:  # every summing layer sees the same labels: the shared index and count are the same
            run.count.copy_(sel_count)
            run.step.copy_(last)
        if call.layer_idx not in run.total:
            run.layers.append(call.layer_idx)
        run.total[call.layer_idx] = total
        mark_static(total)

    def _smi(self, call, out, fire, k_seg, k_step):
        """Several queries at once (prefill, teacher-forced passes), eagerly: inject where steps start."""
        Tq, Tk = call.query.shape[2], call.key.shape[2]
        q_pos, k_pos = self.bound_labels.positions(Tq, Tk)
        rows, pos = torch.nonzero(fire >= 0, as_tuple=True)
        m = step_means(compute_dtype(call.value), rows, pos, fire[rows, pos], k_seg, k_step, k_pos, q_pos[pos],
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


def _cache_capacity(cache) -> int:
    """Positions a preallocated cache holds (0 for caches that grow)."""
    try:
        return max(int(cache.get_max_length()), 0)
    except (AttributeError, TypeError, ValueError):  # no cache, or a dynamic cache with no layers yet
        return 0


def _real_tokens(ids: torch.Tensor, mask, position_ids) -> torch.Tensor:
    """(B, T) bool: which prompt tokens are not left padding.

    ``model.generate`` with a static cache passes prepared masks (a dict of 4D masks) instead of the 2D one;
    then the position ids tell: a row's real tokens are its last ``position_ids[b, -1] + 1``.
    """
    T = ids.shape[1]
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask[:, -T:].bool()
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2:
        n = position_ids[:, -1:] + 1
        return torch.arange(T, device=ids.device)[None, :] >= T - n
    return torch.ones_like(ids, dtype=torch.bool)


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
    resolved = config.resolve(model.config.num_hidden_layers, layer_windows(model.config))
    slid = resolved.sliding(resolved.oeb_layers)
    if slid and not resolved.oeb_default:
        sizes = "/".join(str(w) for w in sorted({resolved.windows[x] for x in slid}))
        warnings.warn(f"OEB layers {','.join(map(str, slid))} were given by hand and use a sliding window ({sizes} "
                      "tokens): they edit only while a bridge key (the question, or the thinking for the summary) "
                      "is inside the window; kept as given", stacklevel=2)
    require_interface(model, interface_layers(model), resolved.oeb_layers | resolved.smi_layers,
                      "StepFlow needs softmax attention in the layers it edits")
    handle = StepFlowHandle(model, tokenizer, config, resolved)
    handle._install = install(model, handle, exclusive="stepflow")  # nested: the innermost StepFlow acts
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
        handle.flush_stream()
    finally:
        handle.remove()


def enabled(model, tokenizer, config: StepFlowConfig | None = None) -> StepFlowHandle:
    """``with stepscope.enabled(model, tokenizer, config): model.generate(...)``."""
    return apply(model, tokenizer, config)
