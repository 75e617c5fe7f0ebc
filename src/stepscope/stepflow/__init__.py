"""Test-time interventions on attention: StepFlow (Odds-Equal Bridge in shallow layers, Step Momentum Injection in
deep layers) and any registered plug-in (:mod:`.intervention`)."""

from .config import StepFlowConfig, parse_layers
from .handle import InterventionHandle, StepFlowHandle, apply, enabled
from .intervention import Edit, Intervention, intervention_from_dict, intervention_kinds, register_intervention

__all__ = ["Edit", "Intervention", "InterventionHandle", "StepFlowConfig", "StepFlowHandle", "apply", "enabled",
           "intervention_from_dict", "intervention_kinds", "parse_layers", "register_intervention"]
