"""What defines an eval run: :class:`Sampling` and the frozen :class:`RunConfig`, its fingerprint (the run id in
every result line), the differences a resumed run is checked for, the problem-set hash and each sample's seed.

The canonical JSON form of :meth:`RunConfig.to_dict` is what ``run.json`` holds and what the fingerprint hashes;
fields added after ``run.json`` existed are written only when set, so older runs keep their run id and resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import StepscopeError
from ..sampling import SamplingConfig
from ..stepflow.intervention import intervention_from_dict
from .conditions import Condition
from .datasets import Problem

if TYPE_CHECKING:
    from .graders import GradingConfig

__all__ = ["RunConfig", "Sampling", "problems_fingerprint", "sample_seed"]


@dataclass(frozen=True)
class Sampling:
    """How each sample is drawn: ``n`` samples per problem of at most ``max_new_tokens``, seeds from ``seed``, and
    the next-token rule, whose fields (temperature 0 meaning greedy, top-p, top-k, min-p, repetition penalty,
    stop strings) are :class:`stepscope.sampling.SamplingConfig`'s and are checked there (see :attr:`config`)."""

    n: int = 1
    temperature: float = SamplingConfig.temperature
    top_p: float = SamplingConfig.top_p
    max_new_tokens: int = 512
    seed: int = 0
    top_k: int = SamplingConfig.top_k
    min_p: float = SamplingConfig.min_p
    repetition_penalty: float = SamplingConfig.repetition_penalty
    stop: tuple[str, ...] = SamplingConfig.stop

    def __post_init__(self) -> None:
        if self.n < 1:
            raise StepscopeError(f"--n must be at least 1 sample per problem, got {self.n}")
        if self.max_new_tokens < 1:
            raise StepscopeError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        config = SamplingConfig(**{k: getattr(self, k) for k in _RULE_FIELDS})  # the one place they are checked
        for k in _RULE_FIELDS:  # normalised there (a list of stop strings becomes a tuple, numbers floats)
            object.__setattr__(self, k, getattr(config, k))

    @property
    def config(self) -> SamplingConfig:
        """The next-token rule, what :func:`stepscope.generate` takes."""
        return SamplingConfig(**{k: getattr(self, k) for k in _RULE_FIELDS})

    def to_dict(self) -> dict:
        """The form kept in run.json. Fields added after run.json existed (top-k, min-p, repetition penalty, stop
        strings) are written only when set, so runs made before them keep their run id and still resume, and a
        resumed run with a changed one reads as a changed config."""
        out = {"n": self.n, "temperature": self.temperature, "top_p": self.top_p,
               "max_new_tokens": self.max_new_tokens, "seed": self.seed}
        out.update({k: v for k, v in self.config.changed().items() if k not in out})
        return out


_RULE_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingConfig))


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run's results; a run directory holds exactly one.

    ``dataset``: the set's name and selection (JSON-able; machine-specific paths such as the data directory
    are left out, and ``problems_sha`` pins the content instead). ``dtype`` and ``device`` (its kind:
    ``cpu``, ``cuda``, ...) are what the model computes in, and ``model_files`` fingerprints a local
    checkpoint (see :func:`stepscope.models.checkpoint_identity`); each is recorded only when set, so runs
    made before they existed still resume.
    """

    model: str
    dataset: Mapping[str, Any]
    problems_sha: str
    num_problems: int
    sampling: Sampling
    conditions: tuple[Condition, ...]
    profile: str = "auto"
    instruction: bool = True
    dtype: str | None = None
    device: str | None = None
    model_files: str | None = None
    grading: GradingConfig | None = None  # None: the default (stepscope) grading

    def __post_init__(self) -> None:
        if not self.conditions:
            raise StepscopeError("a run needs at least one condition")
        names = [c.name for c in self.conditions]
        if len(set(names)) != len(names):
            raise StepscopeError(f"condition names repeat: {names}")

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "dataset": dict(self.dataset),
            "problems_sha": self.problems_sha,
            "num_problems": self.num_problems,
            "sampling": self.sampling.to_dict(),
            # a mapping by name, so a changed field reads as conditions.<name>.<field>
            "conditions": {c.name: c.intervention_dict() for c in self.conditions},
            "profile": self.profile,
            "instruction": self.instruction,
            **{k: getattr(self, k) for k in OPTIONAL_FIELDS if getattr(self, k) is not None},
            # only a non-default mode is written, so default runs keep their run id
            **({"grading": self.grading.to_dict()} if self.grading and self.grading.mode != "stepscope" else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        conditions = tuple(Condition(name, None if cfg is None else intervention_from_dict(cfg))
                           for name, cfg in d["conditions"].items())
        return cls(d["model"], dict(d["dataset"]), d["problems_sha"], int(d["num_problems"]),
                   Sampling(**d["sampling"]), conditions, d.get("profile", "auto"), bool(d.get("instruction", True)),
                   **{k: d.get(k) for k in OPTIONAL_FIELDS}, grading=_grading_config(d.get("grading")))

    def fingerprint(self) -> str:
        """A short hash of the canonical JSON form: the run id written into every result line."""
        return hashlib.sha256(_canonical(self.to_dict()).encode()).hexdigest()[:12]

    def differences(self, other: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
        """``(dotted field, other's value, this value)`` for every field that differs from ``other``."""
        mine, theirs = _flatten(self.to_dict()), _flatten(dict(other))
        return [(k, theirs.get(k, "<absent>"), mine.get(k, "<absent>"))
                for k in sorted(set(mine) | set(theirs)) if mine.get(k, _MISSING) != theirs.get(k, _MISSING)]

    def record_config(self, condition: Condition) -> dict:
        """The settings written into each result line, so a results file can be summarised on its own."""
        s = self.sampling
        return {"run": self.fingerprint(), "model": self.model, "dataset": self.dataset.get("name"), "n": s.n,
                "temperature": s.temperature, "top_p": s.top_p, "max_new_tokens": s.max_new_tokens,
                "seed": s.seed, "sampling": s.config.to_dict(), "stepflow": condition.intervention_dict(),
                "dtype": self.dtype, "device": self.device}


# Top-level config fields added after run.json existed: absent from an older run.json means "not recorded".
OPTIONAL_FIELDS = ("dtype", "device", "model_files")
_MISSING = object()


def _grading_config(d: Mapping[str, Any] | None) -> GradingConfig | None:
    from .graders import GradingConfig  # keeps importing the run config light

    return None if d is None else GradingConfig.from_dict(dict(d))


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def problems_fingerprint(problems: Sequence[Problem]) -> str:
    """Hash of the problem set's ids, questions, answers and graders (what a resumed run must match)."""
    rows = [[p.id, p.question, p.answer, p.grader] for p in problems]
    return hashlib.sha256(_canonical(rows).encode()).hexdigest()[:16]


def sample_seed(base_seed: int, problem_id: str, sample: int) -> int:
    """The seed of one (problem, sample): a stable hash (not Python's salted ``hash``), shared by all conditions."""
    digest = hashlib.sha256(f"{base_seed}\x1f{problem_id}\x1f{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: valid for torch.Generator.manual_seed
