"""The shallow / deep layer bands: the one rule that the saliency scores and StepFlow's default layers share."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .defaults import BAND_FRACTION


@dataclass(frozen=True)
class Bands:
    """Shallow = the bottom ``fraction`` of layers, deep = the top ``fraction`` (both rounded up)."""

    num_layers: int
    fraction: float = BAND_FRACTION

    @property
    def size(self) -> int:
        return max(1, math.ceil(self.num_layers * self.fraction))

    @property
    def shallow(self) -> range:
        return range(self.size)

    @property
    def deep(self) -> range:
        return range(self.num_layers - self.size, self.num_layers)

    def describe(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "fraction": self.fraction,
            "shallow": [self.shallow.start, self.shallow.stop - 1],
            "deep": [self.deep.start, self.deep.stop - 1],
        }
