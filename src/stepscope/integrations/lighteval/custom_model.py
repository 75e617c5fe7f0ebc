"""The model file ``lighteval custom`` loads: lighteval takes the one LightevalModel subclass a file holds, so
this file holds only StepFlow's (``python -m stepscope.integrations.lighteval --model-file`` prints its path)."""

from stepscope.integrations.lighteval import StepFlowTransformersModel

__all__ = ["StepFlowTransformersModel"]
