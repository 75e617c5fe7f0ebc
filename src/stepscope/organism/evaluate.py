"""Held-out evaluation of the organism: greedy answers, accuracy, and where the first wrong step falls.

The first step that leaves the gold solution is the *error site* (later steps inherit its wrong value). Per step
kind we report the *hazard*: among steps reached with everything before them right, the share that go wrong. The
organism is meant to fail mostly at long-range steps, so ``hazard_long`` should be well above ``hazard_local``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from .tasks import Problem, StepCheck, check_response, problem_stream
from .template import prompt_text


@dataclass
class HeldoutResult:
    difficulty: str
    n: int
    correct: int
    accuracy: float
    error_kinds: dict[str, int]  # kind of the first wrong step (operand, arithmetic, format, missing)
    errors_on_long_range: int  # responses whose first wrong step is a long-range step
    errors_on_local: int
    long_range_step_share: float  # share of long-range steps among all gold steps (the no-preference baseline)
    hazard_local: float | None  # P(step wrong | all earlier steps right), local steps
    hazard_long: float | None  # the same for long-range steps
    generated_tokens: int
    seconds: float
    # Where the first wrong step sits: its index (1-based) and its kind of site (local, a premise read from the
    # question far back = premise forgetting, an earlier result read far back = carry-forward).
    first_error_steps: dict[int, int] = field(default_factory=dict)
    first_error_sites: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)

    @property
    def long_range_error_share(self) -> float | None:
        total = self.errors_on_long_range + self.errors_on_local
        return self.errors_on_long_range / total if total else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["long_range_error_share"] = self.long_range_error_share
        d["tokens_per_s"] = self.generated_tokens / self.seconds if self.seconds else None
        return d


def greedy_responses(model, tokenizer, questions: list[str], max_new_tokens: int, batch_size: int = 32
                     ) -> tuple[list[str], int]:
    """Greedy responses (text after the ``<think>\\n`` of the prompt, up to EOS) and the number of new tokens."""
    import torch

    order = sorted(range(len(questions)), key=lambda i: len(questions[i]))  # similar lengths pad less
    out: list[str] = [""] * len(questions)
    n_tokens = 0
    tokenizer.padding_side = "left"
    for a in range(0, len(order), batch_size):
        idx = order[a : a + batch_size]
        enc = tokenizer([prompt_text(questions[i]) for i in idx], add_special_tokens=False, return_tensors="pt",
                        padding=True)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        for row, i in zip(new.tolist(), idx):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            n_tokens += len(row)
            out[i] = tokenizer.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return out, n_tokens


def evaluate_difficulty(model, tokenizer, difficulty: str, key: str, n: int, max_new_tokens: int,
                        batch_size: int = 32, n_examples: int = 3) -> HeldoutResult:
    problems = problem_stream(difficulty, key, n)
    t0 = time.perf_counter()
    responses, n_tokens = greedy_responses(model, tokenizer, [p.question for p in problems], max_new_tokens,
                                           batch_size)
    seconds = time.perf_counter() - t0
    checks = [check_response(p, r) for p, r in zip(problems, responses)]
    return summarise(difficulty, problems, responses, checks, n_tokens, seconds, n_examples)


def summarise(difficulty: str, problems: list[Problem], responses: list[str], checks: list[StepCheck],
              n_tokens: int, seconds: float, n_examples: int = 3) -> HeldoutResult:
    kinds: Counter[str] = Counter()
    positions: Counter[int] = Counter()
    sites: Counter[str] = Counter()
    exposed = {True: 0, False: 0}  # steps reached with all earlier steps right, by long_range
    failed = {True: 0, False: 0}
    for p, c in zip(problems, checks):
        last = c.first_error if c.first_error is not None else len(p.steps)
        for s in p.steps[:last]:
            exposed[s.long_range] += 1
        if c.first_error is not None:
            kinds[c.kind] += 1
            failed[bool(c.long_range)] += 1
            positions[c.first_error] += 1
            sites[_site(p.steps[c.first_error - 1])] += 1
    n_steps = sum(len(p.steps) for p in problems)
    n_long = sum(s.long_range for p in problems for s in p.steps)
    correct = sum(c.correct for c in checks)
    examples = [
        {"question": p.question, "response": r, "answer": p.answer, "correct": c.correct,
         "first_error": c.first_error, "kind": c.kind}
        for p, r, c in list(zip(problems, responses, checks))[:n_examples]
    ]
    return HeldoutResult(
        difficulty=difficulty, n=len(problems), correct=correct,
        accuracy=correct / len(problems) if problems else 0.0,
        error_kinds=dict(sorted(kinds.items())),
        errors_on_long_range=failed[True], errors_on_local=failed[False],
        long_range_step_share=n_long / n_steps if n_steps else 0.0,
        hazard_local=failed[False] / exposed[False] if exposed[False] else None,
        hazard_long=failed[True] / exposed[True] if exposed[True] else None,
        generated_tokens=n_tokens, seconds=seconds,
        first_error_steps=dict(sorted(positions.items())), first_error_sites=dict(sorted(sites.items())),
        examples=examples,
    )


def _site(step) -> str:
    if not step.long_range:
        return "local"
    far = max(step.refs, key=lambda r: r.distance)
    return "long_premise" if far.step == 0 else "long_carry"
