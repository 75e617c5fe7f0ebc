"""The named conditions of an eval run and what each generates with.

A condition is one arm of a comparison: ``baseline`` decodes plainly; ``stepflow`` uses the run's StepFlow
settings; ``oeb-only`` and ``smi-only`` use them with SMI (or OEB) switched off. Every condition of a run
draws the same seed for each (problem, sample), so the arms are paired sample by sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import StepscopeError
from ..stepflow import StepFlowConfig

__all__ = ["CONDITION_NAMES", "Condition", "build_conditions", "parse_conditions"]

CONDITION_NAMES = ("baseline", "stepflow", "oeb-only", "smi-only")


@dataclass(frozen=True)
class Condition:
    """One arm of a comparison: a name and the StepFlow settings it generates with (None: plain decoding)."""

    name: str
    stepflow: StepFlowConfig | None = None

    def stepflow_dict(self) -> dict | None:
        return None if self.stepflow is None else self.stepflow.to_dict()


def parse_conditions(text: str) -> list[str]:
    """``"baseline,stepflow"`` -> ``["baseline", "stepflow"]``, checked against :data:`CONDITION_NAMES`."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise StepscopeError(f"--conditions is empty; list some of {', '.join(CONDITION_NAMES)}")
    for name in names:
        if name not in CONDITION_NAMES:
            raise StepscopeError(f"unknown condition {name!r}; choose from {', '.join(CONDITION_NAMES)}")
    if len(set(names)) != len(names):
        raise StepscopeError("a condition is listed twice in --conditions; list each once")
    return names


def build_conditions(names: Sequence[str], stepflow: StepFlowConfig | None) -> tuple[Condition, ...]:
    """Conditions from names; the StepFlow ones derive from ``stepflow`` (OEB-only drops SMI and vice versa)."""
    out = []
    for name in names:
        if name == "baseline":
            out.append(Condition(name))
            continue
        if name not in CONDITION_NAMES:
            raise StepscopeError(f"unknown condition {name!r}; choose from {', '.join(CONDITION_NAMES)}")
        base = stepflow or StepFlowConfig()
        if name == "oeb-only":
            base = dataclasses.replace(base, smi=False)
        elif name == "smi-only":
            base = dataclasses.replace(base, oeb=False)
        if not (base.oeb or base.smi):
            raise StepscopeError(f"condition {name} has neither OEB nor SMI left (check --no-oeb / --no-smi)")
        out.append(Condition(name, base))
    return tuple(out)
