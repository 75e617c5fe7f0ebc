"""The Step-Saliency result: per-layer step maps, metrics, band scores; saved as NPZ + JSON (no pickle)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ..bands import Bands
from ..defaults import BAND_FRACTION
from ..errors import StepscopeError
from ..trace import Step
from .metrics import band_mean, compute_metrics

FORMAT = "stepscope.step_saliency"


def causal_counts(steps: list[Step]) -> np.ndarray:
    """N[i, j]: number of (query t in i, key k in j) pairs with k <= t, for contiguous ordered steps."""
    S = len(steps)
    n = np.zeros((S, S), dtype=np.int64)
    for i, si in enumerate(steps):
        for j, sj in enumerate(steps[: i + 1]):
            n[i, j] = len(si) * (len(si) + 1) // 2 if i == j else len(si) * len(sj)
    return n


@dataclass
class StepSaliency:
    """Step-to-step saliency of one trace.

    ``sums[l, i, j]``: saliency from query step i to key step j in layer l (summed over token pairs);
    ``counts[i, j]``: causally valid token pairs; ``means = sums / counts``; ``other[l, i]``: saliency from step i
    to tokens in no step (the first token, an attention sink).
    """

    sums: np.ndarray
    counts: np.ndarray
    other: np.ndarray
    steps: list[Step]
    meta: dict = field(default_factory=dict)  # model, question, profile, tokens, loss, options
    band_fraction: float = BAND_FRACTION

    @property
    def num_layers(self) -> int:
        return int(self.sums.shape[0])

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.steps]

    @property
    def means(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), np.nan)

    @property
    def bands(self) -> Bands:
        return Bands(self.num_layers, self.band_fraction)

    @cached_property
    def _metrics(self):
        return compute_metrics(self.sums, self.counts, self.other, self.steps)

    @property
    def metrics(self) -> dict[str, np.ndarray | None]:
        """Metric name -> per-layer values, or None when the trace lacks the segment it needs."""
        return self._metrics[0]

    @property
    def metric_reasons(self) -> dict[str, str]:
        """Why a metric is None."""
        return self._metrics[1]

    @property
    def shallow_lock_in(self) -> float | None:
        """Mean ``local_share`` over the shallow band (higher = more locked into the current step)."""
        return band_mean(self.metrics["local_share"], self.bands.shallow)

    @property
    def deep_decay(self) -> float | None:
        """Mean ``summary_recency_share`` over the deep band (higher = summary sees less of the reasoning)."""
        return band_mean(self.metrics["summary_recency_share"], self.bands.deep)

    def band_scores(self) -> dict:
        return {
            "shallow_lock_in": self.shallow_lock_in,
            "shallow_lock_in_reason": None if self.shallow_lock_in is not None
            else self.metric_reasons.get("local_share", "no value in the band"),
            "deep_decay": self.deep_decay,
            "deep_decay_reason": None if self.deep_decay is not None
            else self.metric_reasons.get("summary_recency_share", "no value in the band"),
            "bands": self.bands.describe(),
        }

    def summary(self) -> dict:
        """Everything except the maps, JSON-ready."""
        return {
            "labels": self.labels,
            "band_scores": self.band_scores(),
            "metrics": {k: None if v is None else [None if np.isnan(x) else float(x) for x in v]
                        for k, v in self.metrics.items()},
            "metric_reasons": self.metric_reasons,
        }

    # -- notebooks (rendering lives in stepscope.notebook) -----------------------------------------------------
    def to_pandas(self):
        """Per-layer metrics as a pandas DataFrame: index ``layer``, a ``band`` column, one column per metric
        (NaN where the trace cannot have it; the reasons in ``df.attrs["metric_reasons"]``). Needs pandas."""
        from ..notebook import saliency_frame

        return saliency_frame(self)

    def __repr__(self) -> str:  # short: sizes and band scores, no arrays
        from ..notebook import saliency_repr

        return saliency_repr(self)

    def _repr_html_(self) -> str:  # Jupyter: band scores, one layer's step map, the metric curves
        from ..notebook import saliency_html

        return saliency_html(self)

    # -- persistence -----------------------------------------------------------------------------------------
    def save(self, path) -> tuple[Path, Path]:
        """Write ``<path>.npz`` (maps) and ``<path>.json`` (steps, meta, metrics)."""
        base = _base(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(base.with_suffix(".npz"), sums=self.sums, counts=self.counts, other=self.other)
        doc = {"format": FORMAT, "version": 1, "steps": [asdict(s) for s in self.steps], "meta": self.meta,
               "band_fraction": self.band_fraction, **self.summary()}
        base.with_suffix(".json").write_text(json.dumps(doc, indent=1, ensure_ascii=False))
        return base.with_suffix(".npz"), base.with_suffix(".json")

    @classmethod
    def load(cls, path) -> StepSaliency:
        base = _base(path)
        try:
            doc = json.loads(base.with_suffix(".json").read_text())
            with np.load(base.with_suffix(".npz"), allow_pickle=False) as z:
                sums, counts, other = z["sums"], z["counts"], z["other"]
        except (OSError, KeyError, ValueError) as e:
            raise StepscopeError(f"cannot read a Step-Saliency result at {base}(.npz/.json): {e}") from None
        if doc.get("format") != FORMAT:
            raise StepscopeError(f"{base}.json is not a Step-Saliency result")
        steps = [Step(**s) for s in doc["steps"]]
        return cls(sums, counts, other, steps, doc.get("meta", {}), doc.get("band_fraction", BAND_FRACTION))


def _base(path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".npz", ".json") else p
