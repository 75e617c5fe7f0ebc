"""The shallow / deep band rule, shared by the saliency scores, StepFlow's default layers and calibration."""

import pytest

from stepscope.bands import Bands
from stepscope.stepflow.config import StepFlowConfig


@pytest.mark.parametrize("layers,fraction,shallow,deep", [
    (30, 0.25, range(8), range(22, 30)),  # rounded up: 7.5 -> 8
    (4, 0.25, range(1), range(3, 4)),
    (2, 0.1, range(1), range(1, 2)),  # at least one layer
    (28, 0.5, range(14), range(14, 28)),
])
def test_bands(layers, fraction, shallow, deep):
    b = Bands(layers, fraction)
    assert (b.shallow, b.deep) == (shallow, deep)
    assert b.describe()["shallow"] == [shallow.start, shallow.stop - 1]
    r = StepFlowConfig(band_fraction=fraction).resolve(layers)
    assert (r.oeb_layers, r.smi_layers) == (frozenset(shallow), frozenset(deep))  # StepFlow's defaults are the bands
