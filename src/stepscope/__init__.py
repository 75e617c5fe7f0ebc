"""stepscope: where a reasoning model's step-to-step information flow breaks, and a test-time repair."""

from .errors import StepscopeError
from .generation import generate
from .models import load_model
from .profiles import PROFILES, FormatProfile, get_profile
from .saliency import StepSaliency, step_saliency
from .stepflow import StepFlowConfig, apply, enabled
from .trace import Step, Trace

__version__ = "0.1.0"

__all__ = [
    "FormatProfile",
    "PROFILES",
    "Step",
    "StepFlowConfig",
    "StepSaliency",
    "StepscopeError",
    "Trace",
    "apply",
    "enabled",
    "generate",
    "get_profile",
    "load_model",
    "step_saliency",
]
