"""Installing an intervention on a model: an attention handler (via the AttentionInterface dispatcher) plus a
pre-forward hook that keeps each row's segment/step labels current. The handle owns the labels and hands each
edit of the intervention (:mod:`.intervention`) the label views of every attention call; ``remove()`` and the
context manager undo both exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.hooks import RemovableHandle

from ..attention.dispatch import AttentionCall, InstallHandle, install, interface_layers, require_interface
from ..errors import StepscopeError
from ..labels import THINKING, BatchLabels, RowLabeler, mark_static
from ..profiles import get_profile
from ..windows import layer_windows
from . import monitor as flow_monitor
from .config import StepFlowConfig
from .intervention import Edit, Intervention, WeightsEdit
from .oeb import groups

__all__ = ["InterventionHandle", "StepFlowHandle", "Views", "apply", "enabled", "session"]


@dataclass(frozen=True)
class Views:
    """Labels of one attention call's queries and keys (shared by every layer of a forward call)."""

    q_pos: torch.Tensor  # (Tq,) absolute positions of the queries
    k_pos: torch.Tensor  # (Tk,) absolute positions of the key slots
    q_seg: torch.Tensor  # (B, Tq) the role each query acts as (OTHER while pending with its segment open)
    q_step: torch.Tensor  # (B, Tq)
    k_seg: torch.Tensor  # (B, Tk)
    k_step: torch.Tensor  # (B, Tk)
    fire: torch.Tensor  # (B, Tq) index of the thinking step that just ended at a new step's first token, else -1
    fire_summary: torch.Tensor  # (B, Tq) the same at the first summary token, else -1
    resolve: torch.Tensor  # (B, Tq) 1 at the first certain token after pending ones
    bridge: torch.Tensor  # (B, 1, Tq, Tk) each query's bridge keys (the question for thinking, thinking for summary)
    current: torch.Tensor  # (B, 1, Tq, Tk) its own segment's keys
    editable: torch.Tensor  # (B, 1, Tq) queries in thinking or summary


@dataclass(eq=False)  # compared by identity: the dispatcher looks handlers up, and fields hold tensors
class InterventionHandle:
    """An intervention installed on a model. ``remove()`` (or leaving the ``with`` block) restores the model."""

    model: torch.nn.Module
    tokenizer: object
    spec: Intervention
    num_layers: int
    windows: tuple = ()  # per layer: sliding window in tokens, or None; () when unknown
    edits: list = field(default_factory=list)
    labels: BatchLabels | None = None
    labeler: RowLabeler | None = None
    # set by an intervention that feeds the flow monitor (StepFlow): the OEB and SMI layer bands
    monitor_bands: tuple[frozenset[int], frozenset[int]] | None = None
    # the flow monitor: per position, sums over (layer, head) of the bridge mass (planes: monitor.PLANES)
    flow: torch.Tensor | None = None
    _auto: bool = True  # track tokens from the forward inputs (model.generate); False when a caller binds labels
    _by_layer: dict = field(default_factory=dict)  # layer -> the edits acting there, in the intervention's order
    _install: InstallHandle | None = None
    _hook: RemovableHandle | None = None
    _removed: bool = False
    _memo_key: tuple | None = None
    _memo: dict = field(default_factory=dict)
    _stream: Callable[[int, flow_monitor.FlowStep], None] | None = None
    _emitted: list = field(default_factory=list)

    @property
    def config(self) -> Intervention:
        """The installed settings (a :class:`StepFlowConfig` for StepFlow)."""
        return self.spec

    # -- the bound state (set by bind(), bind_labels() or a tracked forward call) -------------------------------
    @property
    def bound_labels(self) -> BatchLabels:
        """The labels the edits act on; an error while none are bound."""
        labels = self.labels
        if labels is None:
            raise StepscopeError(f"{self.spec.label} has no labels bound: run the model (or generate) with it "
                                 "applied, or call bind() / bind_labels() first")
        return labels

    @property
    def bound_labeler(self) -> RowLabeler:
        """The labeler of a bound generation (bind() or a tracked model.generate); an error otherwise."""
        labeler = self.labeler
        if labeler is None:
            raise StepscopeError(f"{self.spec.label} has no row labeler bound: it exists only while a generation "
                                 "is tracked (bind() or a model.generate call)")
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
        self._stream = flow_monitor.current_stream() if self.flow is not None else None
        if self._stream is not None:
            self._emitted = [set() for _ in labeler.prompts]
            labeler.listeners.append(self._on_push)

    def bind_labels(self, labels: BatchLabels) -> None:
        """Fixed labels for a teacher-forced pass over finished sequences."""
        self._reset(None, labels)
        self._auto = False

    def _reset(self, labeler: RowLabeler | None, labels: BatchLabels) -> None:
        self.labeler, self.labels = labeler, labels
        self._memo_key, self._memo = None, {}
        self.flow = None
        if labeler is not None and self.monitor_bands is not None:  # the monitor reads generations only
            self.flow = torch.zeros(len(flow_monitor.PLANES), labels.segment.shape[0], labels.capacity,
                                    dtype=torch.float64, device=labels.table.device)
            mark_static(self.flow)
        for edit in self.edits:
            edit.reset(labels)

    def row_stats(self) -> list[dict]:
        """Per batch row, what every edit did (one dict per row, the edits' keys merged)."""
        if self.labels is None:
            return []
        rows: list[dict] = [{} for _ in range(self.labels.segment.shape[0])]
        for edit in self.edits:
            for row, part in zip(rows, edit.row_stats()):
                row.update(part)
        return rows

    def saliency_edit(self, layer: int) -> WeightsEdit | None:
        """The attention weights the edits make ``layer`` use, for Step-Saliency's rebuild (None: unchanged)."""
        found = [fn for fn in (e.saliency_edit(layer) for e in self.edits) if fn is not None]
        if len(found) > 1:
            raise StepscopeError(f"{len(found)} edits of {self.spec.label} change layer {layer}'s attention weights; "
                                 "Step-Saliency can rebuild one edit of the weights per layer")
        return found[0] if found else None

    # -- the forward pre-hook (auto mode: plain model.generate / model(...) calls) ----------------------------
    def _pre_forward(self, module, args, kwargs):
        if self._auto:
            self._track(args, kwargs)

    @torch.compiler.disable  # host work on decoded text; a compiled forward runs it eagerly, before its graph
    def _track(self, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise StepscopeError(f"{self.spec.label} needs input_ids to track reasoning steps (inputs_embeds alone "
                                 "is not supported)")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if int(past) == 0 or self.labeler is None:
            real = _real_tokens(ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))
            rows = [ids[b][real[b]].tolist() for b in range(ids.shape[0])]
            # a static cache hands attention all its slots: size the labels to it up front
            labeler = RowLabeler(self.tokenizer, get_profile(None, self.tokenizer), rows, ids.device,
                                 capacity=_cache_capacity(cache), sink_tokens=sink_tokens_of(self.spec))
            self._reset(labeler, labeler.labels)
        else:
            if ids.shape[1] != 1:
                raise StepscopeError(f"{self.spec.label} tracks one new token per decoding step; multi-token "
                                     "decoding (assisted/speculative generation) is not supported")
            self.labeler.push([int(t) for t in ids[:, 0].tolist()])

    # -- the attention handler -----------------------------------------------------------------------------
    def __call__(self, call: AttentionCall, proceed):
        if self.labels is None:
            return proceed(call)
        active = [e for e in self._by_layer.get(call.layer_idx, ()) if e.acts(call)]
        if not active:
            return proceed(call)
        B, _, Tq, _ = call.query.shape
        Tk = call.key.shape[2]
        self.check_shapes(B, Tq, Tk)
        v = self.views(Tq, Tk)
        out, weights = proceed(call)
        for edit in active:
            out, weights = edit.attend(call, v, out, weights)
        return out, weights

    def views(self, Tq: int, Tk: int) -> Views:
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

    def _build_views(self, Tq: int, Tk: int) -> Views:
        labels = self.bound_labels
        q_pos, k_pos = labels.positions(Tq, Tk)
        _, q_step, q_fire, q_fsum, q_seg, q_resolve = labels.columns(q_pos).unbind(0)
        k_seg, k_step = labels.columns(k_pos)[:2].unbind(0)
        bridge, current, editable = groups(q_seg, k_seg)
        return Views(q_pos, k_pos, q_seg, q_step, k_seg, k_step, q_fire, q_fsum, q_resolve, bridge, current,
                     editable)

    def check_shapes(self, B: int, Tq: int, Tk: int) -> None:
        """The bound labels cover this call's rows, queries and keys (a static cache's slots past the length read
        as OTHER)."""
        labels = self.bound_labels
        what = self.spec.label
        if labels.segment.shape[0] != B:
            raise StepscopeError(f"{what} labels cover {labels.segment.shape[0]} rows but the model attends with "
                                 f"{B} rows; call generate() through stepscope or bind labels")
        if torch.compiler.is_compiling():  # shapes only: the length lives on the device
            if labels.capacity < Tk:
                raise StepscopeError(f"{what} labels hold {labels.capacity} positions but the cache hands "
                                     f"attention {Tk} keys; size the labels to the cache before compiling")
            return
        if labels.length < Tq:
            raise StepscopeError(f"{what} labels cover {labels.length} positions but the model attends with "
                                 f"{Tq} new queries; call generate() through stepscope or bind labels")
        labels.ensure(max(labels.length, Tk))

    def query_offset(self, Tq: int, Tk: int) -> int:
        """Key slot of the first query, for rebuilding a mask the kernel applied implicitly (no 4D mask)."""
        if torch.compiler.is_compiling():
            # compiled static-cache steps always carry a 4D mask; without one a single query sees every key
            return Tk - Tq
        L = self.bound_labels.length
        return L - Tq - max(L - Tk, 0)

    # -- the flow monitor ------------------------------------------------------------------------------------
    def flow_add(self, q_pos, before, after, ed, smi: bool = False) -> None:
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
        labels, labeler, flow, stream = self.bound_labels, self.bound_labeler, self.flow, self._stream
        if flow is None or stream is None:
            raise StepscopeError("flow lines stream only while bound to a generation with a flow stream")
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


StepFlowHandle = InterventionHandle  # the name StepFlow's handle had before interventions became plug-ins


def sink_tokens_of(spec) -> int:
    """Leading tokens of each sequence labelled ``other`` (attention sinks): the intervention's own setting, else 1."""
    return int(getattr(spec, "sink_tokens", 1))


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


def apply(model, tokenizer, config: Intervention | None = None) -> InterventionHandle:
    """Install an intervention (default: StepFlow with the paper's settings) on ``model``; returns its handle
    (``remove()``; also a context manager)."""
    spec = config if config is not None else StepFlowConfig()
    if not isinstance(spec, Intervention):
        raise StepscopeError(f"{type(spec).__name__} is not an intervention: pass a StepFlowConfig or the settings "
                             "of a registered intervention (see stepscope.stepflow.intervention)")
    num_layers = int(model.config.num_hidden_layers)
    layers = spec.layers(num_layers)
    bad = sorted(x for x in layers if not 0 <= x < num_layers)
    if bad:
        raise StepscopeError(f"{spec.label} layers {bad} are out of range for a model with {num_layers} layers "
                             f"(valid: 0-{num_layers - 1})")
    require_interface(model, interface_layers(model), layers,
                      f"{spec.label} needs softmax attention in the layers it edits")
    handle = InterventionHandle(model, tokenizer, spec, num_layers, tuple(layer_windows(model.config)))
    edits: Sequence[Edit] = spec.start(handle)
    handle.edits = list(edits)
    for edit in handle.edits:
        for layer in edit.layers:
            handle._by_layer.setdefault(int(layer), []).append(edit)
    # one intervention acts at a time: a nested installation takes over and hands back on exit
    handle._install = install(model, handle, exclusive="stepflow")
    try:
        handle._hook = model.register_forward_pre_hook(handle._pre_forward, with_kwargs=True)
    except Exception:
        handle._install.remove()
        raise
    return handle


@contextlib.contextmanager
def session(model, tokenizer, config: Intervention, labeler: RowLabeler):
    """An intervention for one batch of our own generation loop, reading the labels it pushes."""
    if not getattr(config, "decodes", True):
        raise StepscopeError(f"{config.label} works on teacher-forced passes over finished traces only, not while "
                             "generating")
    handle = apply(model, tokenizer, config)
    try:
        handle.bind(labeler)
        yield handle
        handle.flush_stream()
    finally:
        handle.remove()



def enabled(model, tokenizer, config: Intervention | None = None) -> InterventionHandle:
    """``with stepscope.enabled(model, tokenizer, config): model.generate(...)``."""
    return apply(model, tokenizer, config)
