"""Chained-quantity word problems with gold ``<think>`` solutions: the organism's training data and eval set.

A problem states a few *premises* ("Mia has 8 coins.") and one *relation* per thinking step ("Mia's friend Ivy has 4
more coins than Mia."). Step ``i`` defines a new person's count from the person defined at step ``i - 1`` (a *local*
step), or from that person and a value stated in the question or computed at least ``reach`` steps back (a
*long-range* step: the paper's premise-forgetting and carry-forward sites). Every step feeds the next, so any wrong
step makes the final answer wrong. The gold solution restates each relation, reads the values it needs, computes, and
states the result, one sentence per step:

    First, Mia's friend Ivy has 4 more coins than Mia, and Mia has 8, and 8 + 4 = 12, so Ivy has 12.

Everything is a pure function of ``(key, index)`` through :class:`random.Random` seeded with a string, so problems
are identical across processes, platforms and ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

from ..errors import StepscopeError

NAMES = (
    "Ava", "Ben", "Cal", "Dan", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jay", "Kim", "Leo", "Mia", "Ned",
    "Oli", "Pam", "Ray", "Sam", "Tom", "Uma", "Val", "Wes", "Zoe", "Amy", "Bob", "Dev", "Eli", "Fin",
    "Gia", "Ian", "Joy", "Kai", "Lia", "Max", "Nia", "Rex", "Tess", "Vic", "Will", "Yara",
)
ITEMS = ("coins", "apples", "marbles", "stickers", "books", "cards", "shells", "stamps", "pencils", "beads",
         "cookies", "toys")


@dataclass(frozen=True)
class Difficulty:
    """Knobs of a problem family.

    ``long_steps``: how many steps are long-range. ``reach``: the minimum distance, in steps, of a long-range
    reference (the question counts as step 0, so a premise used at step ``i`` is ``i`` steps back).
    ``premise_share``: probability that a long-range step reuses a premise from the question rather than an
    earlier step's result. ``distractors``: premises no step uses.
    """

    name: str
    min_steps: int
    max_steps: int
    long_steps: int
    reach: int
    max_value: int
    max_addend: int
    premise_share: float = 0.5
    distractors: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise StepscopeError(f"difficulty {self.name}: need 1 <= min_steps <= max_steps")
        if self.reach < 2:
            raise StepscopeError(f"difficulty {self.name}: reach must be at least 2 (1 is the previous step)")
        if self.max_value < 10 or not 2 <= self.max_addend < self.max_value:
            raise StepscopeError(f"difficulty {self.name}: need max_value >= 10 and 2 <= max_addend < max_value")


# The evaluation ladder. It was set after measuring the default build (docs/organism.md): with one long-range
# step reaching 2 steps back the organism is nearly always right, with one reaching 3 or more back it is right
# about half the time, with two such steps and a distractor rarely. The training mix (build.TRAINING_MIX) is a
# separate list, so moving these does not change what is trained on.
DIFFICULTIES: dict[str, Difficulty] = {
    d.name: d
    for d in (
        Difficulty("easy", 3, 4, long_steps=1, reach=2, max_value=30, max_addend=9),
        Difficulty("medium", 4, 5, long_steps=1, reach=3, max_value=60, max_addend=19),
        Difficulty("hard", 5, 6, long_steps=2, reach=3, max_value=60, max_addend=19, distractors=1),
    )
}


def get_difficulty(difficulty: str | Difficulty) -> Difficulty:
    if isinstance(difficulty, Difficulty):
        return difficulty
    try:
        return DIFFICULTIES[difficulty]
    except KeyError:
        raise StepscopeError(
            f"unknown organism difficulty {difficulty!r}; choose one of {', '.join(DIFFICULTIES)}"
        ) from None


@dataclass(frozen=True)
class Ref:
    """A value a step reads: a premise (``step == 0``, stated in the question) or an earlier step's result."""

    name: str
    step: int
    distance: int  # steps back from the step that reads it


@dataclass(frozen=True)
class GoldStep:
    index: int  # from 1
    name: str
    op: str  # add, sub, double, sum, diff
    refs: tuple[Ref, ...]  # operands in the order the sentence states them
    constant: int | None  # the addend of add/sub
    operands: tuple[int, int]  # the two numbers of the arithmetic, as written
    symbol: str  # "+", "-" or "*"
    value: int
    long_range: bool
    relation: str  # the sentence in the question
    text: str  # the sentence in the solution


@dataclass(frozen=True)
class Problem:
    id: str
    difficulty: str
    item: str
    premises: tuple[tuple[str, int], ...]  # in the order the question states them
    steps: tuple[GoldStep, ...]
    question: str
    answer: int
    knobs: dict = field(default_factory=dict)

    @property
    def thinking(self) -> str:
        """The gold thinking segment (without the ``<think>`` markers): one sentence per line."""
        return "\n".join(s.text for s in self.steps)

    @property
    def summary(self) -> str:
        last = self.steps[-1]
        return f"So {last.name} has {last.value} {self.item}.\n\nThe answer is \\boxed{{{self.answer}}}."

    @property
    def response(self) -> str:
        """What the model writes after the ``<think>\\n`` that ends its generation prompt (EOS not included)."""
        return f"{self.thinking}\n</think>\n\n{self.summary}"

    def to_record(self) -> dict:
        """The evaluation-set record: ``id``, ``question``, ``answer`` (a string) and ``meta``."""
        return {
            "id": self.id,
            "question": self.question,
            "answer": str(self.answer),
            "meta": {
                "difficulty": self.difficulty,
                "knobs": dict(self.knobs),
                "item": self.item,
                "premises": [list(p) for p in self.premises],
                "gold_steps": [_step_record(s) for s in self.steps],
                "long_range_steps": [s.index for s in self.steps if s.long_range],
                "gold_response": self.response,
            },
        }


def _step_record(s: GoldStep) -> dict:
    d = asdict(s)
    d["refs"] = [asdict(r) for r in s.refs]
    d["operands"] = list(s.operands)
    return d


# -- generation ----------------------------------------------------------------------------------------------
class _Retry(Exception):
    """The random choices painted the chain into a corner (e.g. a difference of 0); draw again."""


def make_problem(difficulty: str | Difficulty, key: str, index: int) -> Problem:
    """Problem ``index`` of the stream named ``key``: a pure function of its arguments."""
    diff = get_difficulty(difficulty)
    rng = random.Random(f"stepscope-organism:{key}:{diff.name}:{index}")
    for _ in range(100):
        try:
            return _draw(diff, rng, f"organism-{key}-{diff.name}-{index}")
        except _Retry:
            continue
    raise RuntimeError(f"could not draw a problem for {diff.name} (key {key}, index {index})")  # pragma: no cover


def _draw(diff: Difficulty, rng: random.Random, pid: str) -> Problem:
    n = rng.randint(diff.min_steps, diff.max_steps)
    long_at = _long_positions(diff, n, rng)
    item = rng.choice(ITEMS)
    pool = list(NAMES)
    rng.shuffle(pool)
    premises: list[tuple[str, int]] = []
    values: dict[str, int] = {}
    small = max(2, diff.max_value // 2)

    def new_premise() -> tuple[str, int]:
        p = (pool.pop(), rng.randint(2, small))
        premises.append(p)
        values[p[0]] = p[1]
        return p

    start = new_premise()
    steps: list[GoldStep] = []
    prev = start[0]
    for i in range(1, n + 1):
        name = pool.pop()
        near = Ref(prev, i - 1, 1)
        if i in long_at:
            far = _far_ref(diff, i, steps, rng, new_premise)
            step = _combine_step(diff, i, name, near, far, values, item, rng)
        else:
            step = _local_step(diff, i, name, near, values, item, rng)
        values[name] = step.value
        steps.append(step)
        prev = name
    for _ in range(diff.distractors):
        new_premise()
    others = premises[1:]
    rng.shuffle(others)
    premises = [premises[0], *others]  # the chain's start comes first: step 1 reads the first sentence
    question = " ".join(
        [f"Some friends collect {item}."] + [f"{p} has {v} {item}." for p, v in premises] + [s.relation for s in steps]
        # "<name> has" (one token) lets the model see that the person it just computed is the one asked for.
        + [f"Find how many {item} {steps[-1].name} has."]
    )
    knobs = asdict(diff)
    knobs["steps"] = n
    return Problem(pid, diff.name, item, tuple(premises), tuple(steps), question, steps[-1].value, knobs)


def _long_positions(diff: Difficulty, n: int, rng: random.Random) -> set[int]:
    # A premise is i steps back from step i, so long-range steps can sit at i >= reach.
    eligible = list(range(diff.reach, n + 1))
    return set(rng.sample(eligible, min(diff.long_steps, len(eligible))))


def _far_ref(diff: Difficulty, i: int, steps: list[GoldStep], rng: random.Random, new_premise) -> Ref:
    earlier = [s for s in steps if i - s.index >= diff.reach]
    if earlier and rng.random() >= diff.premise_share:
        s = rng.choice(earlier)
        return Ref(s.name, s.index, i - s.index)
    name, _ = new_premise()
    return Ref(name, 0, i)


def _local_step(diff: Difficulty, i: int, name: str, src: Ref, values: dict, item: str,
                rng: random.Random) -> GoldStep:
    y = values[src.name]
    ops = []
    if y + 2 <= diff.max_value:
        ops.append("add")
    if y > 2:
        ops.append("sub")
    if 2 * y <= diff.max_value:
        ops.append("double")
    if not ops:  # pragma: no cover - max_value >= 10 keeps one op open
        raise _Retry
    op = rng.choice(ops)
    if op == "double":
        return _step(i, name, op, src, (src,), None, (2, y), "*", 2 * y, False,
                     f"twice as many {item} as {src.name}", values)
    if op == "add":
        c = rng.randint(2, min(diff.max_addend, diff.max_value - y))
        return _step(i, name, op, src, (src,), c, (y, c), "+", y + c, False,
                     f"{c} more {item} than {src.name}", values)
    c = rng.randint(1, min(diff.max_addend, y - 1))
    return _step(i, name, op, src, (src,), c, (y, c), "-", y - c, False,
                 f"{c} fewer {item} than {src.name}", values)


def _combine_step(diff: Difficulty, i: int, name: str, near: Ref, far: Ref, values: dict, item: str,
                  rng: random.Random) -> GoldStep:
    a, b = values[near.name], values[far.name]
    if a + b <= diff.max_value and (a == b or rng.random() < 0.6):
        return _step(i, name, "sum", near, (near, far), None, (a, b), "+", a + b, True,
                     f"as many {item} as {near.name} and {far.name} together", values)
    if a == b:
        raise _Retry
    big, small = (near, far) if a > b else (far, near)
    x, y = values[big.name], values[small.name]
    return _step(i, name, "diff", near, (big, small), None, (x, y), "-", x - y, True,
                 f"as many {item} as {big.name} minus {small.name}", values)


def _step(i: int, name: str, op: str, near: Ref, refs: tuple[Ref, ...], constant: int | None,
          operands: tuple[int, int], symbol: str, value: int, long_range: bool, how: str,
          values: dict) -> GoldStep:
    """The relation in the question and the solution sentence of step ``i``.

    The relation names the previous person first ("Ivy's friend Sam has ..."), so the step that continues the
    chain finds its relation by the name it just computed. The solution sentence copies the relation, reads each
    value it needs right after ``<name> has`` (the latest ``<name> has <number>`` in the text is always that
    person's count: reading it is the step's long-range act), computes, and states the result. "First," /
    "Then" keep the leading name after a space, so it is the same token as in the question.
    """
    a, b = operands
    relation = f"{near.name}'s friend {name} has {how}"
    reads = "".join(f", and {r.name} has {values[r.name]}" for r in refs)
    lead = "First," if i == 1 else "Then"
    text = f"{lead} {relation}{reads}, and {a} {symbol} {b} = {value}, so {name} has {value}."
    return GoldStep(i, name, op, tuple(refs), constant, operands, symbol, value, long_range,
                    relation + ".", text)


# -- public views --------------------------------------------------------------------------------------------
def organism_problems(difficulty: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` evaluation records of ``difficulty`` (easy, medium, hard) for ``seed``: see :meth:`Problem.to_record`.

    The stream is disjoint by construction from the training stream (another key), and the build also drops any
    training problem whose question equals one of the held-out questions it reports.
    """
    if n < 0:
        raise StepscopeError("the number of organism problems must be >= 0")
    return [p.to_record() for p in problem_stream(difficulty, f"eval{seed}", n)]


def problem_stream(difficulty: str | Difficulty, key: str, n: int, start: int = 0) -> list[Problem]:
    return [make_problem(difficulty, key, i) for i in range(start, start + n)]


# -- reading a response back ---------------------------------------------------------------------------------
_STEP_RE = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
_BOXED_RE = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")


def extract_answer(response: str) -> str | None:
    """The integer in the last ``\\boxed{...}`` of ``response``, or None."""
    found = _BOXED_RE.findall(response)
    return found[-1] if found else None


@dataclass(frozen=True)
class StepCheck:
    """Where a response first leaves the gold solution.

    ``first_error``: index of the first thinking step that is missing or wrong (None if all steps are right).
    ``kind``: ``operand`` (read a wrong value: the premise-forgetting / carry-forward error), ``arithmetic``
    (right operands, wrong result), ``format`` (the step's arithmetic could not be read), ``missing`` (fewer
    steps than the gold solution), or ``none``.
    """

    correct: bool
    first_error: int | None
    kind: str
    long_range: bool | None  # whether the first wrong step is a long-range step


def check_response(problem: Problem | dict, response: str) -> StepCheck:
    """Compare a model's response step by step with the gold solution."""
    steps = _gold_steps(problem)
    answer = problem.answer if isinstance(problem, Problem) else int(problem["answer"])
    correct = extract_answer(response) == str(answer)
    thinking = response.split("</think>", 1)[0]
    lines = [ln for ln in thinking.split("\n") if ln.strip()]
    for gold in steps:
        if gold["index"] > len(lines):
            return StepCheck(correct, gold["index"], "missing", gold["long_range"])
        m = _STEP_RE.search(lines[gold["index"] - 1])
        if m is None:
            return StepCheck(correct, gold["index"], "format", gold["long_range"])
        a, sym, b, v = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        if (a, b) != tuple(gold["operands"]) or sym != gold["symbol"]:
            return StepCheck(correct, gold["index"], "operand", gold["long_range"])
        if v != gold["value"]:
            return StepCheck(correct, gold["index"], "arithmetic", gold["long_range"])
    return StepCheck(correct, None, "none", None)


def _gold_steps(problem: Problem | dict) -> list[dict]:
    if isinstance(problem, Problem):
        return [_step_record(s) for s in problem.steps]
    return list(problem["meta"]["gold_steps"])


def evaluate_gold(problem: Problem) -> int:
    """Recompute the answer from the question's numbers by following each step's references (a self-check)."""
    values = dict(problem.premises)
    for s in problem.steps:
        x = [values[r.name] for r in s.refs]
        if s.op == "add" and s.constant is not None:
            v = x[0] + s.constant
        elif s.op == "sub" and s.constant is not None:
            v = x[0] - s.constant
        elif s.op == "double":
            v = 2 * x[0]
        elif s.op == "sum":
            v = x[0] + x[1]
        elif s.op == "diff":
            v = x[0] - x[1]
        else:  # pragma: no cover
            raise ValueError(s.op)
        values[s.name] = v
    return values[problem.steps[-1].name]
