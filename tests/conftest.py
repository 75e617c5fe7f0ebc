import os
import warnings

import pytest

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
