"""stepscope: where a reasoning model's step-to-step information flow breaks, and a test-time repair.

The public names are loaded on first use (module ``__getattr__``), so ``import stepscope`` and the command line's
``--help`` do not import torch or transformers; ``stepscope.enabled`` and the rest work as plain attributes.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from .errors import StepscopeError

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY = {
    "FormatProfile": "profiles",
    "PROFILES": "profiles",
    "get_profile": "profiles",
    "register_profile": "profiles",
    "generate": "generation",
    "SamplingConfig": "sampling",
    "load_model": "models",
    "StepSaliency": "saliency",
    "step_saliency": "saliency",
    "StepFlowConfig": "stepflow",
    "apply": "stepflow",
    "enabled": "stepflow",
    "Step": "trace",
    "Trace": "trace",
    "plot_step_map": "saliency.plots",
    "plot_layer_maps": "saliency.plots",
    "plot_metric_curves": "saliency.plots",
    "plot_band_scores": "saliency.plots",
    "save_figure": "figures",
    "load_summary": "evaluation.summary",
    "results_to_pandas": "notebook",
    "analyze": "analysis.api",
    "AnalysisConfig": "analysis.api",
}

__all__ = [
    "PROFILES",
    "AnalysisConfig",
    "FormatProfile",
    "SamplingConfig",
    "Step",
    "StepFlowConfig",
    "StepSaliency",
    "StepscopeError",
    "Trace",
    "analyze",
    "apply",
    "enabled",
    "generate",
    "get_profile",
    "load_model",
    "load_summary",
    "plot_band_scores",
    "plot_layer_maps",
    "plot_metric_curves",
    "plot_step_map",
    "register_profile",
    "results_to_pandas",
    "save_figure",
    "step_saliency",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and editors; at run time the names load lazily
    from .analysis.api import AnalysisConfig, analyze
    from .evaluation.summary import load_summary
    from .figures import save_figure
    from .generation import generate
    from .models import load_model
    from .notebook import results_to_pandas
    from .profiles import PROFILES, FormatProfile, get_profile, register_profile
    from .saliency import StepSaliency, step_saliency
    from .saliency.plots import (
        plot_band_scores,
        plot_layer_maps,
        plot_metric_curves,
        plot_step_map,
    )
    from .sampling import SamplingConfig
    from .stepflow import StepFlowConfig, apply, enabled
    from .trace import Step, Trace


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # a submodule used as an attribute (stepscope.trace.Trace), as when the package imported it eagerly
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
