"""Step-Saliency for a batch of traces: one forward, then a layer-by-layer backward with recomputation.

Layer-wise (the default for known families): a no-grad forward keeps each decoder layer's input (B x T x d) and
call arguments; the loss is computed in row chunks through the final norm and LM head (no T x vocab logits); then
from the top layer down each layer is recomputed with gradients, its input gradient is propagated, and its
attention saliency is rebuilt chunk by chunk from the saved Q/K/V and dL/dO (see :mod:`.pool`). Parameters get no
gradients. Peak memory is one layer's activations plus a chunk.

Whole-model (fallback for unknown layouts): one forward with autograd, saliency computed in each layer's
gradient hook during the backward pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..attention.dispatch import install, require_interface
from ..batch import model_device, pad_batch
from ..defaults import CHUNK_MB, KEEP_MB, SALIENCY_TARGET, SALIENCY_TARGETS
from ..errors import StepscopeError, UnsupportedModelError
from ..families import FAMILIES, decoder_layers, family_facts, final_norm, postprocess_logits
from ..segments import Segment
from ..trace import Trace
from .capture import Capture, LayerRecord
from .pool import StepIndex, layer_step_sums


@dataclass(frozen=True)
class SaliencyOptions:
    target: str = SALIENCY_TARGET  # which next-token losses make up L
    chunk_mb: float = CHUNK_MB  # memory budget of one chunk of query rows
    keep_mb: float = KEEP_MB  # memory for keeping top layers' graphs from the first pass (0: recompute all)
    loss_chunk: int = 512  # rows of logits computed at once for the loss
    method: str = "auto"  # "layerwise", "whole" or "auto"
    progress: bool = True

    def __post_init__(self):
        if self.target not in SALIENCY_TARGETS:
            raise StepscopeError(f"unknown saliency target {self.target!r}; choose one of "
                                 f"{', '.join(SALIENCY_TARGETS)}")
        if self.method not in ("auto", "layerwise", "whole"):
            raise StepscopeError("method must be auto, layerwise or whole")
        if self.chunk_mb <= 0:
            raise StepscopeError("the chunk budget must be positive (MB)")
        if self.keep_mb < 0:
            raise StepscopeError("keep_mb must be >= 0")


@dataclass
class BatchSums:
    sums: list[torch.Tensor]  # per trace (L, S, S) float64
    other: list[torch.Tensor]  # per trace (L, S)
    loss: list[float]  # per trace mean cross-entropy


def target_weights(traces: list[Trace], width: int, target: str, device) -> torch.Tensor:
    """(B, width) weights of next-token losses at each (left-padded) position: 1/n on chosen targets."""
    w = torch.zeros(len(traces), width, dtype=torch.float32)
    for b, t in enumerate(traces):
        n = len(t)
        shift = width - n
        seg = t.segment_ids()
        chosen = []
        for pos in range(n - 1):  # position pos predicts token pos + 1
            nxt = pos + 1
            if target == "generated" and nxt < t.prompt_len:
                continue
            if target == "summary" and seg[nxt] != Segment.SUMMARY:
                continue
            chosen.append(pos)
        if not chosen:
            raise StepscopeError(
                f"trace {b} has no {target} tokens to take the loss over; use --target all"
            )
        w[b, [shift + p for p in chosen]] = 1.0 / len(chosen)
    return w.to(device)


def compute_batch(model, tokenizer, traces: list[Trace], opts: SaliencyOptions, prob_edit=None) -> BatchSums:
    """Saliency sums of a batch; ``prob_edit(layer)`` gives the attention edit active in that layer, if any."""
    device = model_device(model)
    context = getattr(model.config, "max_position_embeddings", None)
    for t in traces:
        if context and len(t) > context:
            raise StepscopeError(f"a trace of {len(t)} tokens is longer than the model's context ({context})")
    batch = pad_batch(model, tokenizer, [t.token_ids for t in traces])
    ids, mask, pos, width = batch.ids, batch.mask, batch.positions, batch.width
    weights = target_weights(traces, width, opts.target, device)
    rows = []
    for t in traces:
        s = torch.full((width,), -1, dtype=torch.long)
        s[width - len(t) :] = torch.from_numpy(t.step_ids())
        rows.append(StepIndex(s.to(device), len(t.steps)))
    n_layers = model.config.num_hidden_layers
    method = opts.method
    if method == "auto":
        method = "layerwise" if family_facts(model) is not None else "whole"
    elif method == "layerwise" and family_facts(model) is None:
        kind = getattr(model.config, "model_type", None) or type(model).__name__
        raise StepscopeError(
            f"method='layerwise' needs the layout of {kind!r} models (decoder layers, final norm, logit transform) "
            f"from stepscope's family table, which lists {', '.join(sorted(FAMILIES))}; use method='whole' (or "
            "'auto', which picks it), or add the family to stepscope.families.FAMILIES"
        )
    edit = prob_edit
    runner = _layerwise if method == "layerwise" else _whole
    with _eval_mode(model):
        return runner(model, ids, mask, pos, weights, rows, n_layers, opts, edit)


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode and parameters without gradients for the call. Saliency needs gradients with respect to
    activations only; with parameters frozen, autograd does not keep each projection's input for a weight
    gradient, so a layer's graph is smaller and more top layers fit in ``keep_mb`` (fewer recomputed)."""
    was = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    try:
        for p in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was)


def _finish(layer_sums, layer_other, n_layers, rows, losses) -> BatchSums:
    sums, other = [], []
    for b in range(len(rows)):
        sums.append(torch.stack([layer_sums[layer][b] for layer in range(n_layers)]).cpu())
        other.append(torch.stack([layer_other[layer][b] for layer in range(n_layers)]).cpu())
    return BatchSums(sums, other, losses)


def _check_finite(t: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    """Refuse NaN/inf in ``t``; ``dtype``: the model's, which the message names (``t`` may be upcast)."""
    # one reduction: a sum of finite values is finite (barring overflow, which the full check then confirms)
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        name = str(dtype).removeprefix("torch.")
        hint = " (it overflows easily in half precision: try --dtype float32)" if dtype.itemsize < 4 else ""
        raise StepscopeError(f"non-finite values (NaN/inf) in {what}; the model computes NaN/inf in {name} on this "
                             f"trace{hint}")


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _bar(total, enabled, desc):
    from ..progress import bar

    return bar(total, desc, "layer", enabled=enabled)  # plain lines when stderr is a log, not silence


def _layer_kinds(model, capture: Capture, n_layers: int) -> None:
    require_interface(model, capture.seen, range(n_layers), "Step-Saliency needs softmax attention in every layer")


class _FirstPass:
    """Hooks for the first forward: keep every layer's input and output; measure one layer's activation memory
    on layer 0 (run with gradients) and keep the autograd graphs of as many top layers as ``keep_mb`` allows, so
    that those need no recomputation."""

    def __init__(self, n_layers: int, keep_mb: float, params: set[int]):
        self.n, self.keep_mb, self.params = n_layers, keep_mb, params
        self.inputs: dict[int, tuple] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (input leaf, output)
        self._leaves: dict[int, torch.Tensor] = {}  # layer -> input leaf, until the layer's output arrives
        self.kept: set[int] = set()
        self._probe_bytes = 0
        self._probe_storages: set[int] = set()
        self._ctx: torch.autograd.graph.saved_tensors_hooks | None = None

    def _pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params and ptr not in self._probe_storages:
            self._probe_storages.add(ptr)
            self._probe_bytes += t.untyped_storage().nbytes()
        return t

    def pre(self, i):
        def hook(module, args, kwargs):
            self.inputs[i] = (args, kwargs)
            probe = i == 0 and self.keep_mb > 0
            if not (probe or i in self.kept):
                return None
            torch.set_grad_enabled(True)
            if probe:
                self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
                self._ctx.__enter__()
            leaf = _hidden_state(args, kwargs).detach().requires_grad_(True)
            self._leaves[i] = leaf
            return _with_hidden_state(args, kwargs, leaf)

        return hook

    def post(self, i):
        def hook(module, args, kwargs, out):
            out = out[0] if isinstance(out, tuple) else out
            if i == 0 and self._ctx is not None:
                self._ctx.__exit__(None, None, None)
                self._ctx = None
                per_layer = max(self._probe_bytes, 1)
                keep = min(self.n - 1, int(self.keep_mb * 2**20 // per_layer))
                self.kept = set(range(self.n - keep, self.n))
                del self._leaves[0]
                torch.set_grad_enabled(False)
                out = out.detach()  # the probe's graph is not kept
                self.outputs[i] = out
                return out
            self.outputs[i] = out
            if i in self.kept:
                self.graphs[i] = (self._leaves.pop(i), out)
                torch.set_grad_enabled(i + 1 in self.kept)  # the layers above run with or without gradients
            return None

        return hook

    def close(self) -> None:
        """Leave the probe's saved-tensor hooks if layer 0 never finished (an error inside it): they are
        process-wide state and would otherwise intercept every autograd graph from then on."""
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)

    def __contains__(self, layer) -> bool:
        """Whether the Capture should record ``layer`` in the first pass: kept layers get their gradients later,
        from the kept graph. (The kept set is decided on layer 0, so it is read when asked.)"""
        return layer in self.kept


def _hidden_state(args: tuple, kwargs: dict) -> torch.Tensor:
    """A decoder layer's hidden-state input, passed positionally or by keyword."""
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden_state(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    """The layer's call arguments with the hidden-state input replaced by ``h``."""
    return ((h,) + tuple(args[1:]), kwargs) if args else (args, dict(kwargs, hidden_states=h))


def _layerwise(model, ids, mask, pos, weights, rows, n_layers, opts, edit) -> BatchSums:
    dtype = _model_dtype(model)
    layers = decoder_layers(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    first = _FirstPass(n_layers, opts.keep_mb, params)
    capture = Capture(wanted=first)
    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(first.pre(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(first.post(i), with_kwargs=True))
        with install(model, capture, outermost=True), torch.no_grad():
            model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    finally:
        first.close()
        for h in handles:
            h.remove()
    _layer_kinds(model, capture, n_layers)
    inputs, outputs = first.inputs, first.outputs

    for i in range(n_layers - 1):  # something running between layers would make recomputation wrong
        if _hidden_state(*inputs[i + 1]) is not outputs[i]:
            return _whole(model, ids, mask, pos, weights, rows, n_layers, opts, edit)

    grad, losses = _loss_grad(model, outputs[n_layers - 1], ids, weights, opts.loss_chunk)
    del outputs
    kept_records = dict(capture.records)
    layer_sums, layer_other = {}, {}
    capture = Capture(wanted=set())
    bar = _bar(n_layers, opts.progress, "step-saliency")
    with install(model, capture, outermost=True), contextlib.closing(bar):
        for i in reversed(range(n_layers)):
            args, kwargs = inputs.pop(i)
            if i in first.graphs:  # graph kept from the first pass
                hidden_input, out = first.graphs.pop(i)
                rec = kept_records.pop(i, None)
                (grad,) = torch.autograd.grad(out, hidden_input, grad_outputs=grad)
            else:
                hidden_input = _hidden_state(args, kwargs).detach().requires_grad_(True)
                new_args, new_kwargs = _with_hidden_state(args, kwargs, hidden_input)
                capture.wanted, capture.records = {i}, {}
                with torch.enable_grad():
                    out = layers[i](*new_args, **new_kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    (grad,) = torch.autograd.grad(out, hidden_input, grad_outputs=grad)
                rec = capture.records.get(i)
            if rec is None or rec.call is None or rec.grad_out is None:
                raise UnsupportedModelError(f"layer {i} of {type(model).__name__} gave no attention gradient")
            _check_finite(rec.grad_out, f"the attention-output gradient of layer {i}", dtype)
            layer_sums[i], layer_other[i] = layer_step_sums(
                rec.call, rec.grad_out, rows, budget_mb=opts.chunk_mb, edit=_bind(edit, i)
            )
            del rec, out
            bar.update(1)
    return _finish(layer_sums, layer_other, n_layers, rows, losses)


def _bind(prob_edit, layer):
    return None if prob_edit is None else prob_edit(layer)


def _loss_grad(model, h_last, ids, weights, loss_chunk):
    """dL/dh of the last layer's output, computing logits a chunk of positions at a time."""
    dtype = _model_dtype(model)
    norm = final_norm(model)
    head = model.get_output_embeddings()
    grad = torch.zeros_like(h_last)
    B, _ = ids.shape
    losses = [0.0] * B
    for b in range(B):
        cols = torch.nonzero(weights[b]).flatten()
        for c0 in range(0, cols.numel(), loss_chunk):
            sel = cols[c0 : c0 + loss_chunk]
            h = h_last[b, sel].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = postprocess_logits(model, head(norm(h))).float()
                _check_finite(logits, "the logits", dtype)
                ce = torch.nn.functional.cross_entropy(logits, ids[b, sel + 1], reduction="none")
                loss = (ce * weights[b, sel]).sum()
                (g,) = torch.autograd.grad(loss, h)
            grad[b, sel] = g
            losses[b] += float(loss.detach())
    return grad, losses


def _whole(model, ids, mask, pos, weights, rows, n_layers, opts, edit) -> BatchSums:
    dtype = _model_dtype(model)
    layer_sums, layer_other = {}, {}
    bar = _bar(n_layers, opts.progress, "step-saliency")

    def on_grad(layer: int, rec: LayerRecord) -> None:
        # the Capture's hook sets grad_out before it calls this, and the call is freed only below
        assert rec.call is not None and rec.grad_out is not None
        _check_finite(rec.grad_out, f"the attention-output gradient of layer {layer}", dtype)
        layer_sums[layer], layer_other[layer] = layer_step_sums(
            rec.call, rec.grad_out, rows, budget_mb=opts.chunk_mb, edit=_bind(edit, layer)
        )
        rec.call = None  # free Q/K/V of this layer as soon as it is pooled
        bar.update(1)

    capture = Capture(wanted=set(range(n_layers)), on_grad=on_grad)
    with install(model, capture, outermost=True), contextlib.closing(bar):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            ce = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            per_row = (ce * weights[:, :-1]).sum(-1)
            _check_finite(per_row, "the loss", dtype)
            torch.autograd.grad(per_row.sum(), embeds)
    _layer_kinds(model, capture, n_layers)
    return _finish(layer_sums, layer_other, n_layers, rows, [float(x) for x in per_row])
