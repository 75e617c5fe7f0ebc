"""StepFlow's lighteval model and its config (imported by the package, which explains them)."""

from __future__ import annotations

from typing import Any

from ...defaults import ALPHA, BAND_FRACTION, TAU_MAX
from ...extras import require
from ..options import FIELDS, stepflow_config

# Any: lighteval is optional (and cannot share an environment with [eval]), so its classes are dynamic bases here
_tm: Any = require("lighteval.models.transformers.transformers_model", "the lighteval integration")
_custom: Any = require("lighteval.models.custom.custom_model", "the lighteval integration")

__all__ = ["StepFlowModelConfig", "StepFlowTransformersModel", "config_from_string"]


class StepFlowModelConfig(_tm.TransformersModelConfig):
    """lighteval's TransformersModelConfig plus the StepFlow settings (paper defaults).

    ``model_name`` may be ``default`` (the embedded SmolLM2-135M-Instruct) or ``organism``. Layer lists are
    ``0-7``, ``0:2:4`` or ``0+2+4`` (lighteval's argument string is split on commas). ``stepflow=false``: plain
    generation under the same settings, for a baseline.
    """

    stepflow: bool = True
    oeb: bool = True
    oeb_layers: str | int | list[int] | None = None
    tau_max: float = TAU_MAX
    smi: bool = True
    smi_layers: str | int | list[int] | None = None
    alpha: float = ALPHA
    smi_window: int | None = None
    smi_at_summary: bool = False
    band_fraction: float = BAND_FRACTION
    sink_tokens: int = 1

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        from ...models import model_path

        self.model_name: str = model_path(self.model_name)  # the field is lighteval's (a str)
        self.stepflow_config()  # refuse bad StepFlow settings before the model loads

    def stepflow_config(self):
        """The :class:`stepscope.StepFlowConfig` these settings describe (None with ``stepflow=false``)."""
        return stepflow_config({k: getattr(self, k) for k in FIELDS}, enabled=self.stepflow)


def config_from_string(args: str) -> StepFlowModelConfig:
    """``"model_name=...,tau_max=0.1,generation_parameters={temperature:0.6}"`` -> a config (lighteval's syntax);
    a bare name is the model name."""
    if "=" not in args:
        return StepFlowModelConfig(model_name=args.strip())
    return StepFlowModelConfig(**StepFlowModelConfig._parse_args(args))


class StepFlowTransformersModel(_tm.TransformersModel):
    """lighteval's Transformers model with StepFlow during generation.

    Built from a :class:`StepFlowModelConfig`, or from the ``CustomModelConfig`` of ``lighteval custom``, whose
    model name then holds the model arguments.
    """

    def __init__(self, config: Any) -> None:
        if isinstance(config, _custom.CustomModelConfig):
            config = config_from_string(config.model_name)
        elif not isinstance(config, StepFlowModelConfig):
            config = StepFlowModelConfig(**config.model_dump())
        if config.continuous_batching:
            from ...errors import StepscopeError

            raise StepscopeError("StepFlow does not support lighteval's continuous batching; leave it off")
        super().__init__(config)
        self.stepflow = config.stepflow_config()
        self.stepflow_rows: list[dict] = []  # per generated row: OEB edits, bridge mass, SMI injections
        self.stepflow_layers = None
        if self.stepflow is not None:
            resolved = self.stepflow.resolve(self.model.config.num_hidden_layers)
            self.stepflow_layers = {"oeb": sorted(resolved.oeb_layers), "smi": sorted(resolved.smi_layers)}

    def _generate_padded(self, *args: Any, **kwargs: Any):
        if self.stepflow is None:
            return super()._generate_padded(*args, **kwargs)
        from ...stepflow import enabled

        with enabled(self.model, self.tokenizer, self.stepflow) as handle:
            out = super()._generate_padded(*args, **kwargs)
            self.stepflow_rows.extend(handle.row_stats())
        return out
