"""Step-Saliency: attention x gradient saliency pooled into step-to-step maps, per layer."""

from .api import step_saliency
from .metrics import METRICS, Bands
from .result import StepSaliency

__all__ = ["METRICS", "Bands", "StepSaliency", "step_saliency"]
