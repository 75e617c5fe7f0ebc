"""lm-evaluation-harness plugin: an lm-eval model named ``stepflow`` that generates with StepFlow on.

``StepFlowLM`` is lm-eval's own Hugging Face model (``HFLM``) whose generation runs inside
:func:`stepscope.enabled`; everything else (batching, stop sequences, chat templates, scoring) is lm-eval's.
StepFlow options are ``model_args`` beside HFLM's::

    python -m stepscope.integrations.lm_eval run --model stepflow \\
        --model_args pretrained=default,tau_max=0.15,alpha=0.06,oeb_layers=0-7 --tasks gsm8k

lm-eval 0.4.13 finds models only in its own registry, so ``python -m stepscope.integrations.lm_eval`` imports
this module (which registers ``stepflow``) and hands its arguments to lm-eval's command line unchanged. In
Python, importing this module is enough: ``lm_eval.simple_evaluate(model="stepflow", ...)``.

Only generation is changed: loglikelihood requests (multiple-choice tasks) score given continuations, which
contain no generated thinking steps, so they run as plain HFLM does.
"""

from __future__ import annotations

from ...extras import MissingExtraError

try:
    from ._model import StepFlowLM
except MissingExtraError as _e:  # the extra is not installed: say so when the model is used (or run), in one line
    _missing: MissingExtraError | None = _e
else:
    _missing = None

__all__ = ["StepFlowLM"]


def __getattr__(name: str):
    if _missing is not None and name in __all__:
        raise _missing
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
