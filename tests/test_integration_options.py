"""StepFlow options as harnesses pass them (strings from key=value lists) become a StepFlowConfig, or a clear error."""

import pytest

from stepscope import StepFlowConfig
from stepscope.errors import StepscopeError
from stepscope.integrations.options import stepflow_config


def test_strings_become_typed_settings():
    cfg = stepflow_config({"tau_max": "0.2", "alpha": 0.1, "oeb_layers": "0-2+5", "smi_layers": "7:9",
                           "smi_window": "4", "smi_at_summary": "true", "oeb": "yes", "band_fraction": "0.5"})
    assert cfg == StepFlowConfig(tau_max=0.2, alpha=0.1, oeb_layers=(0, 1, 2, 5), smi_layers=(7, 9), smi_window=4,
                                 smi_at_summary=True, band_fraction=0.5)


def test_defaults_and_off():
    assert stepflow_config({}) == StepFlowConfig()
    assert stepflow_config({"oeb_layers": "default", "smi_window": "none"}) == StepFlowConfig()
    assert stepflow_config({"tau_max": 0.3}, enabled="false") is None
    assert stepflow_config({"oeb_layers": 3, "smi_layers": [1, 2]}).oeb_layers == (3,)


@pytest.mark.parametrize("options, message", [
    ({"tau": 0.1}, "unknown StepFlow option"),
    ({"alpha": "strong"}, "alpha='strong' is not a number"),
    ({"oeb": "maybe"}, "oeb='maybe' is not true or false"),
    ({"oeb_layers": "a-b"}, "cannot read layer list"),
    ({"tau_max": 1.5}, "tau_max must be in"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(StepscopeError, match=message):
        stepflow_config(options)
