import pytest

from stepscope import StepFlowConfig, StepscopeError
from stepscope.stepflow import parse_layers


def test_default_bands_round_up():
    r = StepFlowConfig().resolve(30)
    assert r.oeb_layers == frozenset(range(8)) and r.smi_layers == frozenset(range(22, 30))
    r = StepFlowConfig().resolve(28)  # R1-Distill-Qwen-7B
    assert r.oeb_layers == frozenset(range(7)) and r.smi_layers == frozenset(range(21, 28))
    assert "OEB on layers 0-6" in r.describe() and "SMI on layers 21-27" in r.describe()


def test_explicit_layers_and_ablations():
    r = StepFlowConfig(oeb_layers=(3, 1, 1), smi=False).resolve(12)
    assert r.oeb_layers == frozenset({1, 3}) and r.smi_layers == frozenset()
    assert "SMI off" in r.describe()


@pytest.mark.parametrize("kwargs, match", [
    (dict(tau_max=1.0), "tau_max"), (dict(tau_max=-0.1), "tau_max"), (dict(alpha=-1), "alpha"),
    (dict(smi_window=0), "smi_window"), (dict(eps=0), "eps"), (dict(band_fraction=0.9), "band_fraction"),
])
def test_validation(kwargs, match):
    with pytest.raises(StepscopeError, match=match):
        StepFlowConfig(**kwargs)


def test_layers_out_of_range():
    with pytest.raises(StepscopeError, match=r"out of range .* 0-11"):
        StepFlowConfig(smi_layers=(12,)).resolve(12)


def test_parse_layers_and_roundtrip():
    assert parse_layers("0-3,7") == (0, 1, 2, 3, 7) and parse_layers("") is None
    with pytest.raises(StepscopeError, match="layer list"):
        parse_layers("a-b")
    c = StepFlowConfig(oeb_layers=(0, 1), smi_window=4)
    assert StepFlowConfig.from_dict(c.to_dict()) == c
