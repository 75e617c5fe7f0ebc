"""The named conditions of an eval run and what each generates with.

A condition is one arm of a comparison: ``baseline`` decodes plainly; ``stepflow`` uses the run's StepFlow
settings; ``oeb-only`` and ``smi-only`` use them with SMI (or OEB) switched off. Any registered intervention
(:mod:`stepscope.stepflow.intervention`) is a condition too, named by its ``kind``, with its default settings or
those given per condition. Every condition of a run draws the same seed for each (problem, sample), so the arms
are paired sample by sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import StepscopeError
from ..stepflow import StepFlowConfig
from ..stepflow.intervention import Intervention, intervention_kinds, intervention_to_dict, intervention_type

__all__ = ["CONDITION_NAMES", "Condition", "build_conditions", "condition_names", "parse_conditions"]

CONDITION_NAMES = ("baseline", "stepflow", "oeb-only", "smi-only")  # the built-in arms


@dataclass(frozen=True)
class Condition:
    """One arm of a comparison: a name and the intervention it generates with (None: plain decoding)."""

    name: str
    intervention: Intervention | None = None

    def intervention_dict(self) -> dict | None:
        return None if self.intervention is None else intervention_to_dict(self.intervention)


def condition_names() -> tuple[str, ...]:
    """The built-in arms, then every registered intervention that can decode (plug-ins included)."""
    extra = [k for k in intervention_kinds()
             if k not in CONDITION_NAMES and getattr(intervention_type(k), "decodes", True)]
    return CONDITION_NAMES + tuple(extra)


def parse_conditions(text: str) -> list[str]:
    """``"baseline,stepflow"`` -> ``["baseline", "stepflow"]``, checked against :func:`condition_names`."""
    known = condition_names()
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise StepscopeError(f"--conditions is empty; list some of {', '.join(known)}")
    for name in names:
        if name not in known:
            raise StepscopeError(f"unknown condition {name!r}; choose from {', '.join(known)}")
    if len(set(names)) != len(names):
        raise StepscopeError("a condition is listed twice in --conditions; list each once")
    return names


def build_conditions(names: Sequence[str], stepflow: StepFlowConfig | None,
                     settings: Mapping[str, Intervention] | None = None) -> tuple[Condition, ...]:
    """Conditions from names. The StepFlow ones derive from ``stepflow`` (OEB-only drops SMI and vice versa); a
    plug-in takes its settings from ``settings[name]``, else its defaults."""
    settings = dict(settings or {})
    known = condition_names()
    unused = sorted(set(settings) - set(names))
    if unused:
        raise StepscopeError(f"settings were given for {', '.join(unused)}, which is not among the conditions; add "
                             "it to --conditions")
    out = []
    for name in names:
        if name == "baseline":
            out.append(Condition(name))
            continue
        if name not in known:
            raise StepscopeError(f"unknown condition {name!r}; choose from {', '.join(known)}")
        if name not in CONDITION_NAMES:
            spec = settings.get(name)
            out.append(Condition(name, spec if spec is not None else _default(name)))
            continue
        base = stepflow or StepFlowConfig()
        if name == "oeb-only":
            base = dataclasses.replace(base, smi=False)
        elif name == "smi-only":
            base = dataclasses.replace(base, oeb=False)
        if not (base.oeb or base.smi):
            raise StepscopeError(f"condition {name} has neither OEB nor SMI left (check --no-oeb / --no-smi)")
        out.append(Condition(name, base))
    return tuple(out)


def _default(kind: str) -> Intervention:
    cls = intervention_type(kind)
    try:
        return cls()
    except TypeError as e:
        raise StepscopeError(f"intervention {kind!r} has settings without defaults ({e}); give them with "
                             f"--intervention-option {kind}.NAME=VALUE") from None
