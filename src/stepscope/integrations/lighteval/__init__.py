"""lighteval plugin: lighteval's Transformers model, generating with StepFlow on.

``StepFlowTransformersModel`` is lighteval's ``TransformersModel`` whose padded generation runs inside
:func:`stepscope.enabled`; prompts, batching, stop sequences, metrics and details are lighteval's. It loads through
lighteval's custom-model path (``lighteval custom NAME FILE TASKS``), where NAME carries the model arguments in
lighteval's own ``key=value,...`` syntax, StepFlow options included::

    python -m stepscope.integrations.lighteval \\
        "model_name=default,dtype=float32,tau_max=0.15,alpha=0.06" "stepscope_tiny|0" --custom-tasks tasks.py

which runs ``lighteval custom`` with the model file :mod:`stepscope.integrations.lighteval.custom_model` filled in
(``python -m stepscope.integrations.lighteval --model-file`` prints its path). In Python, pass
``StepFlowTransformersModel(StepFlowModelConfig(...))`` to lighteval's ``Pipeline(model=...)``.

Only generation is changed: loglikelihood requests score given continuations, which contain no generated thinking
steps, so they run as in lighteval's Transformers model. Continuous batching is not supported (StepFlow follows
each row's tokens through ``generate``).
"""

from __future__ import annotations

from ...extras import MissingExtraError

try:
    from ._model import (
        StepFlowModelConfig,
        StepFlowTransformersModel,
        config_from_string,
    )
except MissingExtraError as _e:  # the extra is not installed: say so when the model is used (or run), in one line
    _missing: MissingExtraError | None = _e
else:
    _missing = None

__all__ = ["StepFlowModelConfig", "StepFlowTransformersModel", "config_from_string"]


def __getattr__(name: str):
    if _missing is not None and name in __all__:
        raise _missing
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
