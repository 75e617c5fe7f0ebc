"""Training checkpoints without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint is a directory ``step-NNNNNN/`` holding ``model.safetensors`` (the weights), ``optimizer.safetensors``
(per-parameter optimizer tensors plus the torch RNG state) and ``state.json`` (step, settings fingerprint, loss
curve, optimizer hyper-parameters, elapsed training time). It is written to a temporary name and renamed, so a
build killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

_PREFIX = "step-"


@dataclass
class TrainState:
    """The scalars a resumed run needs besides tensors."""

    step: int
    fingerprint: str
    loss_curve: list[list[float]] = field(default_factory=list)  # [step, mean loss since the last point]
    train_seconds: float = 0.0
    window_sum: float = 0.0  # losses since the last loss-curve point (a pause may fall between points)
    window_count: int = 0


def save_checkpoint(root: Path, model, optimizer, state: TrainState, keep: int = 2) -> Path:
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{state.step:06d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # clone(): tied embeddings share storage, which safetensors refuses; contiguous copies are independent.
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    tensors, groups = _flatten_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    payload = {**asdict(state), "param_groups": groups}
    (tmp / "state.json").write_text(json.dumps(payload, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(root: Path, fingerprint: str) -> Path | None:
    """The newest checkpoint written with the same settings, or None."""
    for path in reversed(list_checkpoints(root)):
        try:
            if json.loads((path / "state.json").read_text())["fingerprint"] == fingerprint:
                return path
        except (OSError, ValueError, KeyError):
            continue
    return None


def load_checkpoint(path: Path, model, optimizer) -> TrainState:
    """Restore ``model`` and ``optimizer`` in place from ``path``; return the saved scalars."""
    import torch
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    _retie(model)
    payload = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, payload["param_groups"]))
    payload.pop("param_groups")
    return TrainState(**payload)


def _retie(model) -> None:
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def _flatten_optimizer(sd: dict) -> tuple[dict, list[dict]]:
    import torch

    tensors = {}
    for idx, per_param in sd["state"].items():
        for name, value in per_param.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{idx}.{name}"] = t.detach().clone().contiguous()
    return tensors, [dict(g) for g in sd["param_groups"]]


def _unflatten_optimizer(tensors: dict, groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": groups}
