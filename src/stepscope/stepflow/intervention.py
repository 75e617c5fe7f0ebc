"""Interventions as plug-ins: what a test-time attention edit provides, and the registry that names them.

An *intervention* is a frozen settings object (a dataclass) with a registered ``kind``. Installed on a model
(:func:`stepscope.stepflow.apply`), it starts one or more *edits* on the handle, the object that owns the labels
(segment and step of every position, from the live tracker while decoding or from a finished trace's spans on a
teacher-forced pass). The handle calls each edit in the layers it names, after the model's own attention kernel
has run, with the labels of that call's queries and keys; the same edit therefore serves generation and full
passes. StepFlow itself is a composition: :class:`~stepscope.stepflow.config.StepFlowConfig` starts the Odds-Equal
Bridge edit (:mod:`.oeb_edit`) and the Step Momentum Injection edit (:mod:`.smi_edit`).

Adding one is a module that defines the settings class and its edit, plus ``@register_intervention``. The eval
runner can then run it as a condition named by its ``kind`` (``--conditions baseline,<kind>``), run records store
it as ``to_dict()`` (with ``"kind"``), and summaries describe it through :meth:`Intervention.describe`. Packages
expose theirs to the command line through the ``stepscope.interventions`` entry-point group, or a user lists
modules to import in ``$STEPSCOPE_PLUGINS`` (comma-separated).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from ..errors import StepscopeError
from ..plugins import ENV as PLUGIN_ENV

if TYPE_CHECKING:
    import torch

    from ..attention.dispatch import AttentionCall
    from .handle import InterventionHandle, Views

__all__ = [
    "PLUGIN_ENV",
    "Edit",
    "Intervention",
    "WeightsEdit",
    "describe_dict",
    "intervention_from_dict",
    "intervention_kinds",
    "intervention_to_dict",
    "intervention_type",
    "register_intervention",
]


# (call, batch row, q0, q1, k0, k1, masked logits (H, c, k)) -> the attention weights (H, c, k) the layer used
WeightsEdit = Callable[..., "torch.Tensor"]


@runtime_checkable
class Intervention(Protocol):
    """Settings of one test-time edit (frozen; JSON-serialisable through ``to_dict`` / ``from_dict``)."""

    kind: ClassVar[str]  # the registry name; also the eval condition that runs it with these settings
    label: ClassVar[str]  # how messages name it ("StepFlow", "question boost")
    # optional class attributes: ``decodes = False`` for edits that need a finished sequence (no eval condition,
    # refused by generate); ``sink_tokens``: leading tokens labelled as attention sinks (default 1)

    def layers(self, num_layers: int) -> frozenset[int]:
        """The layers it may edit in a model of ``num_layers`` layers (checked against AttentionInterface)."""
        ...

    def start(self, handle: InterventionHandle) -> Sequence[Edit]:
        """The edits to run, created when the intervention is installed (``handle.model``, ``handle.tokenizer``)."""
        ...

    def describe(self, num_layers: int | None = None) -> str:
        """One line for printouts and summaries (``num_layers`` None: as configured, unresolved)."""
        ...

    def to_dict(self) -> dict:
        ...


class Edit:
    """One edit of an installed intervention. Subclasses override what they need; the defaults do nothing.

    Lifecycle: ``reset(labels)`` each time the handle binds labels (a new batch); ``acts(call)`` before the model's
    kernel runs in a layer of ``layers`` (False skips the layer at no cost); ``attend(call, views, out, weights)``
    after it, returning the (possibly) edited output ``(B, Tq, H, D)`` and weights ``(B, H, Tq, Tk)`` or None.
    Decoding calls have one query, teacher-forced passes many; code that runs under ``torch.compile`` must avoid
    host reads when ``torch.compiler.is_compiling()``.
    """

    layers: frozenset[int] = frozenset()

    def reset(self, labels) -> None:
        """New labels were bound (a new batch): clear per-batch state."""

    def acts(self, call: AttentionCall) -> bool:
        return call.layer_idx in self.layers

    def attend(self, call: AttentionCall, views: Views, out: torch.Tensor, weights: torch.Tensor | None):
        return out, weights

    def saliency_edit(self, layer: int) -> WeightsEdit | None:
        """For Step-Saliency on a teacher-forced pass: how this edit changes ``layer``'s attention weights, or None
        when it leaves them alone (edits of the output need nothing here: the backward pass sees them)."""
        return None

    def row_stats(self) -> list[dict]:
        """Per batch row, what the edit did (merged into ``trace.meta["stepflow"]``); [] when it records nothing."""
        return []


_REGISTRY: dict[str, type] = {}


def register_intervention(cls: type) -> type:
    """Class decorator: make an intervention settings class known by its ``kind``."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind or kind == "baseline":
        raise StepscopeError(f"{cls.__name__} needs a class attribute kind: a non-empty name other than 'baseline'")
    if not dataclasses.is_dataclass(cls):
        raise StepscopeError(f"intervention {kind!r} must be a (frozen) dataclass, so that runs can record it")
    for method in ("layers", "start", "describe", "to_dict"):
        if not callable(getattr(cls, method, None)):
            raise StepscopeError(f"intervention {kind!r} lacks the method {method}()")
    known = _REGISTRY.get(kind)
    if known is not None and known is not cls and known.__qualname__ != cls.__qualname__:
        raise StepscopeError(f"two interventions are registered as {kind!r}: {known.__module__}.{known.__qualname__} "
                             f"and {cls.__module__}.{cls.__qualname__}")
    _REGISTRY[kind] = cls
    return cls


def _load_plugins() -> None:
    """The built-in interventions, then those of installed packages and of ``$STEPSCOPE_PLUGINS``."""
    from .. import plugins
    from . import config as _config  # noqa: F401  (registers stepflow)
    from . import controls as _controls  # noqa: F401  (registers the StepFlow controls)

    plugins.load("interventions")


def intervention_kinds() -> tuple[str, ...]:
    """Every registered kind (built-ins and plug-ins), sorted."""
    _load_plugins()
    return tuple(sorted(_REGISTRY))


def intervention_type(kind: str) -> type:
    _load_plugins()
    cls = _REGISTRY.get(kind)
    if cls is None:
        raise StepscopeError(f"unknown intervention {kind!r}; known: {', '.join(sorted(_REGISTRY))} (plug-ins "
                             "load from the 'stepscope.interventions' entry points and "
                             f"${PLUGIN_ENV})")
    return cls


def intervention_from_dict(d: Mapping[str, Any]) -> Intervention:
    """Rebuild settings from ``to_dict()``; a dict without ``kind`` is StepFlow (records made before plug-ins)."""
    d = dict(d)
    kind = str(d.pop("kind", "stepflow"))
    cls = intervention_type(kind)
    from_dict = getattr(cls, "from_dict", None)
    try:
        return from_dict(d) if callable(from_dict) else cls(**d)
    except TypeError as e:
        raise StepscopeError(f"cannot rebuild intervention {kind!r} from {d}: {e}") from None


def intervention_to_dict(obj: Any) -> dict:
    """``obj.to_dict()`` with its ``kind``, as run records store it. StepFlow's dict carries no kind, so that the
    records (and run fingerprints) made before plug-ins existed still match."""
    d = obj.to_dict()
    kind = type(obj).kind
    return d if kind == "stepflow" else {"kind": kind, **d}


def describe_dict(d: Mapping[str, Any] | None, num_layers: int | None = None) -> str:
    """A summary line for a recorded intervention (``None``: plain decoding); unknown kinds are shown raw."""
    if d is None:
        return "off (plain decoding)"
    try:
        return intervention_from_dict(d).describe(num_layers)
    except StepscopeError:
        fields = ", ".join(f"{k}={v}" for k, v in d.items() if k != "kind")
        return f"{d.get('kind', '?')} ({fields}; not installed here)"


# how command lines and harness arguments write a boolean setting (also read by stepscope.integrations.options)
BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def settings_from_options(kind: str, options: Mapping[str, str]) -> Intervention:
    """Settings of intervention ``kind`` from ``name=value`` strings (a command line), read by the field types
    of its dataclass: bool, int, float, str, a layer list (``0-3,8``) for tuples, ``none`` for optional ones."""
    import typing

    from .config import parse_layers

    cls = intervention_type(kind)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, text in options.items():
        if name not in fields:
            raise StepscopeError(f"intervention {kind!r} has no setting {name!r}; it has {', '.join(fields)}")
        hint = hints.get(name, str)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = type(None) in typing.get_args(hint)
        base = args[0] if optional and len(args) == 1 else hint
        value = str(text).strip()
        if optional and value.lower() in ("none", ""):
            kwargs[name] = None
            continue
        origin = typing.get_origin(base)
        try:
            if base is bool:
                if value.lower() not in BOOL_WORDS:
                    raise ValueError
                kwargs[name] = BOOL_WORDS[value.lower()]
            elif base is int:
                kwargs[name] = int(value)
            elif base is float:
                kwargs[name] = float(value)
            elif origin is tuple or base is tuple:
                kwargs[name] = parse_layers(value)
            else:
                kwargs[name] = value
        except ValueError:
            raise StepscopeError(f"{kind}.{name}={text!r} is not a valid {getattr(base, '__name__', base)}") from None
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise StepscopeError(f"cannot make intervention {kind!r} from {dict(options)}: {e}") from None


def parse_option_flags(values: Sequence[str]) -> dict[str, Intervention]:
    """``["boost.beta=2", "boost.layers=0-1"]`` (``--intervention-option``) -> {kind: settings}."""
    grouped: dict[str, dict[str, str]] = {}
    for item in values:
        head, sep, value = item.partition("=")
        kind, dot, name = head.partition(".")
        if not (sep and dot and kind.strip() and name.strip()):
            raise StepscopeError(f"--intervention-option {item!r}: write it as KIND.NAME=VALUE, e.g. boost.beta=2")
        grouped.setdefault(kind.strip(), {})[name.strip()] = value
    return {kind: settings_from_options(kind, opts) for kind, opts in grouped.items()}
