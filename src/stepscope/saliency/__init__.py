"""Step-Saliency: attention x gradient saliency pooled into step-to-step maps, per layer."""

from ..bands import Bands
from .api import step_saliency
from .metrics import METRICS
from .result import StepSaliency

__all__ = ["METRICS", "Bands", "StepSaliency", "step_saliency"]
