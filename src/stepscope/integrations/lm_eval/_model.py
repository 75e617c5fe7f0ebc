"""The ``stepflow`` lm-eval model (imported by the package, which explains it)."""

from __future__ import annotations

from typing import Any

from ...extras import require
from ..options import FIELDS, stepflow_config

# Any: lm-eval ships no types, so its classes are dynamic bases here
_registry: Any = require("lm_eval.api.registry", "the lm-eval integration")
_hf: Any = require("lm_eval.models.huggingface", "the lm-eval integration")


@_registry.register_model("stepflow")
class StepFlowLM(_hf.HFLM):
    """HFLM with StepFlow during generation. ``pretrained`` may also be ``default`` (the embedded
    SmolLM2-135M-Instruct) or ``organism``; ``device`` defaults to CUDA when there is one, else the CPU.
    ``stepflow=false`` turns StepFlow off (plain HFLM, for a baseline under the same settings)."""

    def __init__(self, pretrained: Any = "default", device: str | None = None, stepflow: Any = True,
                 **kwargs: Any) -> None:
        from ...models import model_path

        options = {k: kwargs.pop(k) for k in FIELDS if k in kwargs}
        config = stepflow_config(options, enabled=stepflow)  # bad options fail before the model loads
        if isinstance(pretrained, str):
            pretrained = model_path(pretrained)
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(pretrained=pretrained, device=device, **kwargs)
        self.stepflow_config = config
        self.stepflow_layers = None
        if config is not None:
            resolved = config.resolve(self.model.config.num_hidden_layers)
            self.stepflow_layers = {"oeb": sorted(resolved.oeb_layers), "smi": sorted(resolved.smi_layers)}
        self.stepflow_rows: list[dict] = []  # per generated row: OEB edits, bridge mass, SMI injections

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        if self.stepflow_config is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        from ...stepflow import enabled

        with enabled(self.model, self.tokenizer, self.stepflow_config) as handle:
            out = super()._model_generate(context, max_length, stop, **generation_kwargs)
            self.stepflow_rows.extend(handle.row_stats())
        return out

    def stepflow_activity(self) -> dict:
        """What StepFlow did over all generations so far (totals of the per-row statistics)."""
        rows = self.stepflow_rows
        edits = sum(sum(r["oeb_edits_per_layer"].values()) for r in rows)
        before = [r["bridge_mass_before"] for r in rows if r["bridge_mass_before"] is not None]
        after = [r["bridge_mass_after"] for r in rows if r["bridge_mass_after"] is not None]
        return {"rows": len(rows), "oeb_edits": edits, "smi_injections": sum(r["smi_injections"] for r in rows),
                "bridge_mass_before": sum(before) / len(before) if before else None,
                "bridge_mass_after": sum(after) / len(after) if after else None}

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        # lm-eval writes this into its results file: the StepFlow settings, the layers used, what it did
        info["stepflow"] = None if self.stepflow_config is None else {
            "config": self.stepflow_config.to_dict(), "layers": self.stepflow_layers,
            "activity": self.stepflow_activity()}
        return info
