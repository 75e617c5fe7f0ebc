"""One registered attention function per base implementation, running a chain of handlers per layer.

``install(model, handler)`` registers ``"stepscope:<base>"`` with ``AttentionInterface`` *and*
``AttentionMaskInterface`` (without the mask registration ``transformers`` would build no causal mask for the
new name), switches the model to it, and puts ``handler`` on the chain of every attention module. A handler gets
the call and a ``proceed`` function (the rest of the chain, ending in the model's own implementation) and
decides per ``call.layer_idx`` what to do. Removing the last handle switches the model back to its original
implementation name; nothing else about the model is touched.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UnsupportedModelError

PREFIX = "stepscope:"


@dataclass
class AttentionCall:
    """The arguments ``transformers`` passes to an attention function, as one object."""

    # the attention layer (a torch.nn.Module, or an _Ungrouped view of one); its attributes (layer_idx,
    # num_key_value_groups, sliding_window, ...) are the model family's, which nn.Module's types cannot name
    module: Any
    query: torch.Tensor  # (batch, heads, q_len, head_dim), after RoPE / q-norm
    key: torch.Tensor  # (batch, kv_heads, k_len, head_dim), including the cache
    value: torch.Tensor  # (batch, kv_heads, k_len, head_dim)
    attention_mask: torch.Tensor | None  # as built by the mask function of the base implementation
    kwargs: dict = field(default_factory=dict)  # scaling, dropout, sliding_window, s_aux (sinks), softcap, ...

    @property
    def layer_idx(self) -> int:
        return self.module.layer_idx

    @property
    def scaling(self) -> float:
        s = self.kwargs.get("scaling")
        return s if s is not None else self.query.shape[-1] ** -0.5

    @property
    def sinks(self) -> torch.Tensor | None:
        return self.kwargs.get("s_aux")

    @property
    def softcap(self) -> float | None:
        return self.kwargs.get("softcap")


Handler = Callable[[AttentionCall, Callable[[AttentionCall], tuple]], tuple]


@dataclass(eq=False)
class _Entry:
    """One installed handler; ``exclusive``: among entries with the same key, only the innermost runs."""

    handler: Handler
    exclusive: str | None = None


# attention module -> installed entries, outermost first
_ENTRIES: weakref.WeakKeyDictionary[torch.nn.Module, list[_Entry]] = weakref.WeakKeyDictionary()
# attention module -> the handlers that run, outermost first (derived from _ENTRIES on every change)
_CHAINS: weakref.WeakKeyDictionary[torch.nn.Module, list[Handler]] = weakref.WeakKeyDictionary()
# model -> (original implementation name, number of live handles)
_INSTALLED: weakref.WeakKeyDictionary[torch.nn.Module, list] = weakref.WeakKeyDictionary()


def attention_modules(model) -> list[torch.nn.Module]:
    """Modules that call the attention interface, in layer order (they carry an integer ``layer_idx``)."""
    mods = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    return sorted(mods, key=lambda m: m.layer_idx)


def _base_function(base: str, module: torch.nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base != "eager" and base in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[base]
    # "eager" is each model's own function, defined next to its attention class.
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} has no eager attention function to delegate to; load the model with "
            "attn_implementation='sdpa'"
        )
    return fn


class _Ungrouped:
    """A view of an attention module whose key/value heads were already repeated to the query heads."""

    num_key_value_groups = 1

    def __init__(self, module: torch.nn.Module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)


def expand_groups_for_sdpa(call: AttentionCall, force: bool = False) -> AttentionCall:
    """On CUDA in float32, repeat grouped key/value heads before SDPA.

    SDPA's grouped-query path (``enable_gqa``) has no float32 kernel on CUDA but the math one, which holds
    heads x T x T scores: 9 GiB per layer at 16k tokens. With the heads repeated, the memory-efficient kernel runs
    in O(T) memory. Exact float32 is what Step-Saliency and its checks run in, so this is the case that matters.
    """
    q, k = call.query, call.key
    groups = getattr(call.module, "num_key_value_groups", 1)
    wanted = force or (q.is_cuda and q.dtype == torch.float32)
    if not wanted or groups <= 1 or q.shape[2] == 1 or k.shape[1] == q.shape[1]:
        return call
    n_rep = q.shape[1] // k.shape[1]

    def rep(x):
        b, h, t, d = x.shape
        return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)

    return AttentionCall(_Ungrouped(call.module), q, rep(k), rep(call.value), call.attention_mask, call.kwargs)


def _make_dispatcher(base: str):
    def dispatch(module, query, key, value, attention_mask, **kwargs):
        base_fn = _base_function(base, module)

        def run(i: int, call: AttentionCall):
            if i == len(chain):
                call = expand_groups_for_sdpa(call) if base == "sdpa" else call
                return base_fn(call.module, call.query, call.key, call.value, call.attention_mask, **call.kwargs)
            return chain[i](call, lambda c: run(i + 1, c))

        chain = _CHAINS.get(module, [])
        return run(0, AttentionCall(module, query, key, value, attention_mask, kwargs))

    dispatch.__name__ = f"stepscope_dispatch_{base}"
    return dispatch


def _register(base: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = PREFIX + base
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_dispatcher(base))
    if name not in AttentionMaskInterface._global_mapping:
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS.get(base) or ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
        AttentionMaskInterface.register(name, mask_fn)
    return name


def current_implementation(model) -> str:
    return model.config._attn_implementation or "eager"


def _set_implementation(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers read the config attribute at call time
        model.config._attn_implementation = name


def _update_chain(module: torch.nn.Module) -> None:
    """Rebuild ``module``'s running chain: every entry, except outer ones shadowed by an inner exclusive twin."""
    entries = _ENTRIES.get(module, [])
    if not entries:
        _ENTRIES.pop(module, None)
        _CHAINS.pop(module, None)
        return
    keys: set[str] = set()
    chain: list[Handler] = []
    for e in reversed(entries):  # innermost first
        if e.exclusive is not None:
            if e.exclusive in keys:
                continue
            keys.add(e.exclusive)
        chain.insert(0, e.handler)
    _CHAINS[module] = chain


@dataclass(eq=False)  # handlers are compared by identity: a handler's own == may compare tensors
class InstallHandle:
    """Undo for :func:`install`; also a context manager."""

    model: torch.nn.Module
    handler: Handler
    modules: list
    _removed: bool = False
    _entry: _Entry | None = None

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        for m in self.modules:
            entries = _ENTRIES.get(m)
            if entries is not None:
                entries[:] = [e for e in entries if e is not self._entry]
                _update_chain(m)
        entry = _INSTALLED.get(self.model)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                _set_implementation(self.model, entry[0])
                del _INSTALLED[self.model]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def install(model, handler: Handler, *, outermost: bool = False, exclusive: str | None = None) -> InstallHandle:
    """Put ``handler`` on every attention module's chain (innermost unless ``outermost``).

    ``exclusive``: a key such as ``"stepflow"``; while several handlers with the same key are installed, only the
    innermost one (the latest, unless ``outermost``) runs, so a nested installation takes over and hands back.
    """
    modules = attention_modules(model)
    if not modules:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no attention modules with a layer_idx; stepscope needs a transformers "
            "model whose attention goes through AttentionInterface"
        )
    if model in _INSTALLED:
        _INSTALLED[model][1] += 1
    else:
        original = current_implementation(model)
        if original.startswith(PREFIX):
            original = original[len(PREFIX) :]
        name = _register(original)
        _set_implementation(model, name)
        _INSTALLED[model] = [original, 1]
    entry = _Entry(handler, exclusive)
    for m in modules:
        entries = _ENTRIES.setdefault(m, [])
        if outermost:
            entries.insert(0, entry)
        else:
            entries.append(entry)
        _update_chain(m)
    return InstallHandle(model, handler, modules, _entry=entry)


# model -> (implementation name, layers whose attention went through the interface), from a probe forward
_PROBED: weakref.WeakKeyDictionary[torch.nn.Module, tuple[str, frozenset[int]]] = weakref.WeakKeyDictionary()


def interface_layers(model) -> frozenset[int]:
    """Layers whose attention goes through ``AttentionInterface``, found by one two-token forward call (cached per
    model and implementation). Some models (Falcon, for one) compute attention themselves and never call it."""
    impl = current_implementation(model)
    impl = impl[len(PREFIX) :] if impl.startswith(PREFIX) else impl
    cached = _PROBED.get(model)
    if cached is not None and cached[0] == impl:
        return cached[1]
    seen: set[int] = set()

    def record(call: AttentionCall, proceed):
        seen.add(call.layer_idx)
        return proceed(call)

    ids = torch.zeros((1, 2), dtype=torch.long, device=next(model.parameters()).device)
    with install(model, record, outermost=True), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    _PROBED[model] = (impl, frozenset(seen))
    return _PROBED[model][1]


def require_interface(model, seen: Iterable[int], layers: Iterable[int], needs: str) -> None:
    """Refuse a model whose ``layers`` did not call attention through the interface (``seen``: those that did).

    Step-Saliency and StepFlow both read softmax attention weights there; a model that bypasses the interface gets
    this one message from both. ``needs``: what the caller needs, for the message about some layers missing.
    """
    seen = set(seen)
    missing = sorted(set(layers) - seen)
    if not seen:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no layer called a softmax attention function through transformers' "
            "AttentionInterface, so Step-Saliency and StepFlow (attention x gradient, edits of softmax weights) "
            "are not defined for it"
        )
    if missing:
        raise UnsupportedModelError(
            f"{type(model).__name__}: layers {missing} do not use softmax attention through AttentionInterface "
            f"(linear/recurrent layers?); {needs}"
        )
