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
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import UnsupportedModelError

PREFIX = "stepscope:"


@dataclass
class AttentionCall:
    """The arguments ``transformers`` passes to an attention function, as one object."""

    module: torch.nn.Module
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

# attention module -> handlers, outermost first
_CHAINS: "weakref.WeakKeyDictionary[torch.nn.Module, list[Handler]]" = weakref.WeakKeyDictionary()
# model -> (original implementation name, number of live handles)
_INSTALLED: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


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


@dataclass
class InstallHandle:
    """Undo for :func:`install`; also a context manager."""

    model: torch.nn.Module
    handler: Handler
    modules: list
    _removed: bool = False

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        for m in self.modules:
            chain = _CHAINS.get(m)
            if chain is not None and self.handler in chain:
                chain.remove(self.handler)
                if not chain:
                    del _CHAINS[m]
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


def install(model, handler: Handler, *, outermost: bool = False) -> InstallHandle:
    """Put ``handler`` on every attention module's chain (innermost unless ``outermost``)."""
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
    for m in modules:
        chain = _CHAINS.setdefault(m, [])
        if outermost:
            chain.insert(0, handler)
        else:
            chain.append(handler)
    return InstallHandle(model, handler, modules)


def base_implementation(model) -> str:
    """The model's own implementation name, even while stepscope handlers are installed."""
    entry = _INSTALLED.get(model)
    return entry[0] if entry else current_implementation(model)
