"""``stepscope organism build``: train the thinking model organism from scratch, deterministically, resumably.

Pipeline: tokenizer (byte-level BPE trained on generated problems) -> a small Llama model from a seeded init ->
supervised training on a seeded stream of problems (loss on the response only) with checkpoints -> held-out
evaluation per difficulty -> ``model/`` (safetensors + tokenizer + chat template) and ``organism.json``.

Layout under the organism root (default ``cache_dir()/organism``)::

    checkpoints/tokenizer/        the tokenizer of the run being trained
    checkpoints/step-NNNNNN/      the last two checkpoints (see :mod:`.checkpoint`)
    model/                        the finished model, loadable with load_model("organism")
    model/organism.json           seed, settings, loss curve, held-out results, timings

Why from scratch rather than fine-tuning SmolLM2-135M: measured on one core, a SmolLM2 training step of 8 x 200
tokens takes about 20 s and it generates about 25 tokens/s; the default organism trains at several thousand
tokens/s and generates hundreds of tokens/s per batch, which the later evaluations (hundreds of problems times
several conditions) need. See docs/organism.md for the measurements.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..cache import cache_dir
from ..errors import StepscopeError
from .checkpoint import TrainState, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .tasks import DIFFICULTIES, Difficulty, Problem, make_problem, problem_stream
from .template import EOS, build_tokenizer, prompt_text

log = logging.getLogger(__name__)

METADATA = "organism.json"
FORMAT = "stepscope.organism"
VERSION = 1


# -- settings ------------------------------------------------------------------------------------------------
TRAINING_MIX: tuple[tuple[Difficulty, float], ...] = (
    (Difficulty("train-easy", 3, 4, long_steps=1, reach=2, max_value=30, max_addend=9), 1.0),
    (Difficulty("train-medium", 5, 6, long_steps=2, reach=3, max_value=60, max_addend=19, distractors=1), 1.0),
    (Difficulty("train-hard", 7, 8, long_steps=3, reach=4, max_value=99, max_addend=29, distractors=2), 1.0),
)

@dataclass(frozen=True)
class ModelSettings:
    """A Llama decoder: several layers (the analysis uses the bottom and top quarter) and multi-head attention."""

    layers: int = 6
    hidden: int = 192
    heads: int = 6
    kv_heads: int = 3  # grouped-query attention, as in SmolLM2 and Qwen2
    intermediate: int = 512
    vocab_size: int = 1024  # the BPE's upper bound; it stops earlier when no pair repeats (about 750)
    max_positions: int = 1024
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 3600
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    # Problem families of the training stream and their weights. They are settings of their own, not the
    # evaluation difficulties, so that the evaluation sets can be tuned without changing what was trained on.
    mix: tuple[tuple[Difficulty, float], ...] = TRAINING_MIX
    tokenizer_problems: int = 300  # per difficulty, for training the BPE
    # Mixed precision (weights and optimizer stay float32): about 1.5x faster on CPUs with bf16 instructions.
    bf16: bool = True
    # Also train on the question's tokens: predicting "than <name>" there teaches copying names from context
    # early, which the response's look-ups build on.
    loss_on_prompt: bool = True


@dataclass(frozen=True)
class EvalSettings:
    n_per_difficulty: int = 200
    max_new_tokens: int = 400
    batch_size: int = 50
    difficulties: tuple[str, ...] = ("easy", "medium", "hard")


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the weights (plus evaluation settings). ``threads``, ``checkpoint_every`` and
    ``log_every`` do not enter the fingerprint: they change speed and bookkeeping, not what is learnt."""

    seed: int = 0
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    threads: int = 1
    checkpoint_every: int = 200
    log_every: int = 25

    def settings(self) -> dict:
        return {"seed": self.seed, "model": asdict(self.model), "train": asdict(self.train), "eval": asdict(self.eval)}

    def fingerprint(self) -> str:
        blob = json.dumps(self.settings(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict) -> BuildConfig:
        """Settings from JSON (the ``settings`` block of organism.json, or any part of it); the rest default."""
        known = {"seed", "model", "train", "eval", "threads", "checkpoint_every", "log_every"}
        unknown = set(d) - known
        if unknown:
            raise StepscopeError(f"unknown organism settings {sorted(unknown)}; allowed: {sorted(known)}")
        try:
            train = dict(d.get("train", {}))
            if "mix" in train:
                train["mix"] = tuple((_difficulty(k), float(w)) for k, w in train["mix"])
            evs = dict(d.get("eval", {}))
            if "difficulties" in evs:
                evs["difficulties"] = tuple(evs["difficulties"])
            return cls(
                seed=int(d.get("seed", 0)),
                model=ModelSettings(**d.get("model", {})),
                train=TrainSettings(**train),
                eval=EvalSettings(**evs),
                threads=int(d.get("threads", 1)),
                checkpoint_every=int(d.get("checkpoint_every", 200)),
                log_every=int(d.get("log_every", 25)),
            )
        except (TypeError, ValueError) as e:
            raise StepscopeError(f"bad organism settings: {e}") from None

    def with_overrides(self, *, seed: int | None = None, steps: int | None = None, threads: int | None = None,
                       eval_n: int | None = None) -> BuildConfig:
        cfg = self
        if seed is not None:
            cfg = replace(cfg, seed=seed)
        if steps is not None:
            cfg = replace(cfg, train=replace(cfg.train, steps=steps))
        if threads is not None:
            cfg = replace(cfg, threads=threads)
        if eval_n is not None:
            cfg = replace(cfg, eval=replace(cfg.eval, n_per_difficulty=eval_n))
        return cfg


class BuildPaused(StepscopeError):
    """The build stopped at its time budget after writing a checkpoint; running it again continues."""


def _difficulty(spec) -> Difficulty:
    """A training family from JSON: a knob dict, or the name of an evaluation difficulty."""
    if isinstance(spec, str):
        if spec not in DIFFICULTIES:
            raise StepscopeError(f"unknown difficulty {spec!r}; choose from {', '.join(DIFFICULTIES)}")
        return DIFFICULTIES[spec]
    return Difficulty(**spec)


@dataclass
class BuildResult:
    path: Path  # the model directory
    metadata: dict
    cached: bool  # True: an existing build with the same settings was reused


# -- entry point ---------------------------------------------------------------------------------------------
def organism_root(out: str | Path | None = None) -> Path:
    return Path(out).expanduser() if out is not None else cache_dir() / "organism"


def build(config: BuildConfig | None = None, out: str | Path | None = None, force: bool = False,
          progress: bool = True, max_minutes: float | None = None) -> BuildResult:
    """Build the organism under ``out`` (default ``cache_dir()/organism``), or reuse an identical build.

    A build stopped at any point resumes from its last checkpoint when run again with the same settings.
    ``max_minutes``: checkpoint and raise :class:`BuildPaused` once training has run this long in this call.
    """
    import torch

    config = config or BuildConfig()
    _check_config(config)
    root = organism_root(out)
    model_dir = root / "model"
    existing = read_metadata(model_dir)
    if existing is not None and not force:
        if existing.get("fingerprint") == config.fingerprint():
            if existing.get("heldout_difficulties") != heldout_ladder(config):
                existing = refresh_heldout(model_dir, existing, config, progress)
            return BuildResult(model_dir, existing, cached=True)
        raise StepscopeError(
            f"an organism built with other settings exists in {model_dir}; pass --force to replace it "
            "or --out DIR to build elsewhere"
        )
    ckpt_root = root / "checkpoints"
    if force:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    torch.set_num_threads(config.threads)
    t_start = time.perf_counter()
    tokenizer = _tokenizer(config, ckpt_root)
    deadline = None if max_minutes is None else time.perf_counter() + 60 * max_minutes
    model, state, _ = _train(config, tokenizer, ckpt_root, progress, deadline)
    t_eval = time.perf_counter()
    heldout = heldout_evaluation(model, tokenizer, config, progress)
    eval_seconds = time.perf_counter() - t_eval
    metadata = _metadata(config, model, tokenizer, state, heldout, eval_seconds,
                         session_seconds=time.perf_counter() - t_start)
    _save_model(model, tokenizer, metadata, model_dir)
    return BuildResult(model_dir, metadata, cached=False)


def heldout_ladder(config: BuildConfig) -> dict:
    """The knobs of each held-out difficulty, as recorded in organism.json."""
    return {d: asdict(DIFFICULTIES[d]) for d in config.eval.difficulties}


def refresh_heldout(model_dir: Path, metadata: dict, config: BuildConfig, progress: bool = False) -> dict:
    """Re-measure a finished build's held-out accuracy for the current difficulty definitions.

    The definitions are not part of the fingerprint (they do not change what is trained on), so a build made
    under older definitions is kept and only its held-out numbers are brought up to date.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    t0 = time.perf_counter()
    heldout = heldout_evaluation(model, tokenizer, config, progress)
    updated = {
        **metadata,
        "heldout": heldout,
        "heldout_difficulties": heldout_ladder(config),
        "accuracy": {d: r["accuracy"] for d, r in heldout.items()},
        "wall_seconds": {**metadata.get("wall_seconds", {}), "eval": round(time.perf_counter() - t0, 1)},
        "heldout_measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    text = json.dumps(updated, indent=1)
    (Path(model_dir) / METADATA).write_text(text)
    return json.loads(text)  # as a later read_metadata sees it (JSON keys are strings)


def read_metadata(model_dir: Path) -> dict | None:
    path = Path(model_dir) / METADATA
    if not path.exists() or not (Path(model_dir) / "config.json").exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_config(config: BuildConfig) -> None:
    unknown = [d for d in config.eval.difficulties if d not in DIFFICULTIES]
    if unknown:
        raise StepscopeError(f"unknown difficulty {unknown[0]!r}; choose from {', '.join(DIFFICULTIES)}")
    if not config.train.mix or any(w < 0 for _, w in config.train.mix) or not sum(w for _, w in config.train.mix):
        raise StepscopeError("the training mix needs at least one family with a positive weight")
    if config.train.steps < 1 or config.train.batch_size < 1:
        raise StepscopeError("the number of training steps and the batch size must be at least 1")
    if config.model.hidden % config.model.heads or config.model.heads % config.model.kv_heads:
        raise StepscopeError("hidden size must divide into heads, and heads into key/value heads")
    if config.threads < 1:
        raise StepscopeError("--threads must be at least 1")
    if config.checkpoint_every < 1 or config.log_every < 1:
        raise StepscopeError("checkpoint_every and log_every must be at least 1")


# -- data ----------------------------------------------------------------------------------------------------
def heldout_key(seed: int) -> str:
    return f"heldout{seed}"


def batch_difficulty(config: BuildConfig, step: int) -> Difficulty:
    """The problem family of training batch ``step``. One per batch: similar lengths waste little on padding."""
    rng = random.Random(f"stepscope-organism-mix:{config.seed}:{step}")
    families = [d for d, _ in config.train.mix]
    weights = [w for _, w in config.train.mix]
    return rng.choices(families, weights)[0]


def training_batch(config: BuildConfig, step: int, exclude: frozenset[str]) -> list[Problem]:
    """The problems of batch ``step``: a pure function of ``(seed, step)``, so a resumed run sees the same data."""
    d = batch_difficulty(config, step)
    bs = config.train.batch_size
    return [training_problem(config, step * bs + j, exclude, d) for j in range(bs)]


def training_problem(config: BuildConfig, k: int, exclude: frozenset[str],
                     difficulty: str | Difficulty = "medium") -> Problem:
    """Training problem ``k`` of ``difficulty``, never one of the held-out questions in ``exclude``."""
    problem = make_problem(difficulty, f"train{config.seed}", k)
    alt = 0
    while problem.question in exclude:  # never train on a held-out question
        alt += 1
        problem = make_problem(difficulty, f"train{config.seed}-alt{alt}", k)
    return problem


def heldout_questions(config: BuildConfig) -> frozenset[str]:
    ev = config.eval
    return frozenset(p.question for d in ev.difficulties
                     for p in problem_stream(d, heldout_key(config.seed), ev.n_per_difficulty))


def encode_batch(tokenizer, problems: list[Problem], loss_on_prompt: bool = False):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding and, unless
    ``loss_on_prompt``, on the prompt)."""
    import torch

    rows, labels = [], []
    for p in problems:
        prompt = tokenizer(prompt_text(p.question), add_special_tokens=False)["input_ids"]
        response = tokenizer(p.response + EOS, add_special_tokens=False)["input_ids"]
        rows.append(prompt + response)
        labels.append(([-100] + prompt[1:] if loss_on_prompt else [-100] * len(prompt)) + response)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def _tokenizer(config: BuildConfig, ckpt_root: Path):
    """The run's tokenizer: reloaded when resuming (so ids cannot drift), else trained and stored."""
    from transformers import AutoTokenizer

    tok_dir = ckpt_root / "tokenizer"
    stamp = tok_dir / "fingerprint.txt"
    if stamp.exists() and stamp.read_text() == config.fingerprint():
        return AutoTokenizer.from_pretrained(str(tok_dir))
    n = config.train.tokenizer_problems
    families = [d for d, _ in config.train.mix]
    corpus = [text for d in families for p in problem_stream(d, f"tokenizer{config.seed}", n)
              for text in (p.question, p.response)]
    tokenizer = build_tokenizer(corpus, config.model.vocab_size)
    shutil.rmtree(ckpt_root, ignore_errors=True)  # checkpoints of other settings are useless now
    tok_dir.mkdir(parents=True)
    tokenizer.save_pretrained(str(tok_dir))
    stamp.write_text(config.fingerprint())
    return AutoTokenizer.from_pretrained(str(tok_dir))


# -- model and training --------------------------------------------------------------------------------------
def new_model(settings: ModelSettings, tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden,
        intermediate_size=settings.intermediate,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.kv_heads,
        max_position_embeddings=settings.max_positions,
        # transformers 5 still takes rope_theta (into rope_parameters) but its typed signature omits it; 4.x needs it
        rope_theta=settings.rope_theta,  # type: ignore[call-arg]
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _optimizer(model, settings: TrainSettings):
    import torch

    # No weight decay on norms (1-d tensors): standard practice, keeps the RMSNorm gains free.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.98), eps=1e-8,
    )


def learning_rate(settings: TrainSettings, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    span = max(1, settings.steps - settings.warmup)
    t = min(1.0, (step - settings.warmup) / span)
    return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _train(config: BuildConfig, tokenizer, ckpt_root: Path, progress: bool, deadline: float | None = None):
    import torch

    from .. import progress as progress_

    ts = config.train
    model = new_model(config.model, tokenizer, config.seed)
    optimizer = _optimizer(model, ts)
    state = TrainState(0, config.fingerprint())
    resume = latest_checkpoint(ckpt_root, config.fingerprint())
    if resume is not None:
        state = load_checkpoint(resume, model, optimizer)
        log.warning("resuming the organism build from %s", resume.name)
    exclude = heldout_questions(config)
    model.train()
    t_mark = time.perf_counter()
    bar = progress_.bar(ts.steps, "organism", "step", enabled=progress, initial=state.step)
    try:
        while state.step < ts.steps:
            step = state.step
            batch = encode_batch(tokenizer, training_batch(config, step, exclude), ts.loss_on_prompt)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(ts, step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ts.bf16):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), ts.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.window_sum += loss.item()
            state.window_count += 1
            bar.update(1)
            if state.step % config.log_every == 0 or state.step == ts.steps:
                mean = state.window_sum / state.window_count
                state.loss_curve.append([state.step, round(mean, 5)])
                bar.set_postfix(loss=f"{mean:.4f}")
                state.window_sum, state.window_count = 0.0, 0
            out_of_time = deadline is not None and time.perf_counter() > deadline
            if state.step % config.checkpoint_every == 0 or state.step == ts.steps or out_of_time:
                now = time.perf_counter()
                state.train_seconds += now - t_mark
                t_mark = now
                save_checkpoint(ckpt_root, model, optimizer, state)
            if out_of_time and state.step < ts.steps:
                raise BuildPaused(f"organism build paused at step {state.step}/{ts.steps} (time budget reached); "
                                  "run the same command again to continue")
    finally:
        bar.close()
    model.eval()
    return model, state, state.train_seconds


def heldout_evaluation(model, tokenizer, config: BuildConfig, progress: bool = False) -> dict:
    from .. import progress as progress_
    from .evaluate import evaluate_difficulty

    ev = config.eval
    results = {}
    bar = progress_.bar(len(ev.difficulties), "held-out eval", "difficulty", enabled=progress)
    try:
        for d in ev.difficulties:
            r = evaluate_difficulty(model, tokenizer, d, heldout_key(config.seed), ev.n_per_difficulty,
                                    ev.max_new_tokens, ev.batch_size)
            results[d] = r.to_dict()
            bar.update(1)
    finally:
        bar.close()
    return results


# -- output --------------------------------------------------------------------------------------------------
def _metadata(config: BuildConfig, model, tokenizer, state: TrainState, heldout: dict, eval_seconds: float,
              session_seconds: float) -> dict:
    import torch
    import transformers

    return {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": config.fingerprint(),
        "seed": config.seed,
        "settings": config.settings(),
        "data": {
            "training_stream": f"train{config.seed}, families "
                               + ", ".join(f"{d.name} x{w:g}" for d, w in config.train.mix),
            "training_problems": config.train.steps * config.train.batch_size,
            "heldout_stream": heldout_key(config.seed),
            "tokenizer_stream": f"tokenizer{config.seed}",
        },
        "model": {"architecture": "LlamaForCausalLM", "parameters": sum(p.numel() for p in model.parameters()),
                  "vocab_size": len(tokenizer), "layers": config.model.layers, "heads": config.model.heads,
                  "kv_heads": config.model.kv_heads},
        "loss_curve": state.loss_curve,
        "heldout": heldout,
        "heldout_difficulties": heldout_ladder(config),
        "accuracy": {d: r["accuracy"] for d, r in heldout.items()},
        "wall_seconds": {"train": round(state.train_seconds, 1), "eval": round(eval_seconds, 1),
                         "this_session": round(session_seconds, 1)},
        "threads": config.threads,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _save_model(model, tokenizer, metadata: dict, model_dir: Path) -> None:
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / METADATA).write_text(json.dumps(metadata, indent=1))
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)


__all__ = [
    "BuildConfig",
    "BuildPaused",
    "BuildResult",
    "EvalSettings",
    "ModelSettings",
    "TrainSettings",
    "build",
    "encode_batch",
    "heldout_evaluation",
    "learning_rate",
    "list_checkpoints",
    "new_model",
    "organism_root",
    "read_metadata",
    "training_batch",
    "training_problem",
]
