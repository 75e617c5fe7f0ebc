import os
import warnings

import pytest

from stepscope import sandbox  # light: no torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizers():
    from stepscope.testing import tiny_tokenizer

    return {p: tiny_tokenizer(p) for p in ("plain", "think", "harmony")}


@pytest.fixture(scope="session")
def default_model():
    """The real default model (converted once into the user cache, then loaded from it)."""
    import stepscope

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stepscope.load_model("default")


@pytest.fixture
def quiet():
    """Silence warnings (modules use it with ``pytestmark = pytest.mark.usefixtures("quiet")``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random llama (2 layers, plain-profile tokenizer) saved to disk, for command-line tests."""
    from stepscope.testing import tiny_model, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny-model")
    tok = tiny_tokenizer("plain")
    tiny_model("llama", tok, layers=2).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(params=list(sandbox.BACKENDS))
def sandbox_backend(request, monkeypatch):
    """Run a test under each isolation backend this machine supports (the fallbacks too); the others skip."""
    from stepscope.errors import StepscopeError
    from stepscope.sandbox import runner

    try:
        works = bool(runner._working_plans(request.param))
    except StepscopeError:
        works = False
    if not works:
        pytest.skip(f"the {request.param} backend does not work here")
    monkeypatch.setenv(sandbox.ENV_VAR, request.param)
    return request.param
