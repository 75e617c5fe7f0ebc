"""StepFlow: Odds-Equal Bridge in shallow layers and Step Momentum Injection in deep layers, at test time."""

from .config import StepFlowConfig, parse_layers
from .handle import StepFlowHandle, apply, enabled

__all__ = ["StepFlowConfig", "StepFlowHandle", "apply", "enabled", "parse_layers"]
