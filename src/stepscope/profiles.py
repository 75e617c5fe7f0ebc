"""Trace format profiles: where thinking ends and the summary starts, kept as data.

A profile describes a model's output format, not a model. The step rule inside the thinking segment is the
same for every profile (see :mod:`stepscope.steps`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import StepscopeError


@dataclass(frozen=True)
class FormatProfile:
    """How a response splits into thinking and summary.

    ``summary_after``: a regex; the summary starts at the first token after the token that completes the first
    match (the marker itself stays in thinking). ``answer_line``: a regex; when only markup (no letter or digit)
    stands between the first match and the later of the beginning of its line and of its thinking step, the summary
    starts there (``Final answer: 7`` on its own line, ``**The answer is 7**``); a match inside a sentence
    (``so the answer is 7``) is glued to thinking like a closing marker, and the summary starts at the token after
    the one completing it. Both are decidable while generating, a few characters after the marker begins (see
    :mod:`stepscope.tracker`). ``last_paragraph``: with no marker, the last paragraph is the summary (known only
    once the response is finished; StepFlow sees it as thinking).
    ``max_marker_chars`` bounds how far back a streaming matcher must look. ``prompt_style``: which benchmark
    instructions its prompts get: ``"think"`` (reason, then put the answer in ``\\boxed{}``) or ``"plain"`` (one
    short sentence per step, then a ``Final answer:`` line).
    """

    name: str
    description: str
    summary_after: str | None = None
    answer_line: str | None = None
    last_paragraph: bool = False
    max_marker_chars: int = 64
    # Text appended to a bare question so that a model of this format reasons in steps and states an answer.
    instruction: str = ""
    prompt_style: str = "think"

    def __post_init__(self):
        if self.prompt_style not in PROMPT_STYLES:
            raise StepscopeError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {self.prompt_style!r}")
        if not (self.summary_after or self.answer_line or self.last_paragraph):
            raise StepscopeError(f"format profile {self.name!r} has no way to find the summary: give summary_after, "
                                 "answer_line or last_paragraph")


PROMPT_STYLES = ("think", "plain")


THINK = FormatProfile(
    name="think",
    description="<think> ... </think> then the answer (DeepSeek-R1-Distill, QwQ, Qwen3 thinking)",
    summary_after=r"</think>",
    max_marker_chars=16,
)

HARMONY = FormatProfile(
    name="harmony",
    description="GPT-OSS harmony: the analysis channel is thinking, the final channel the summary",
    summary_after=r"<\|channel\|>final(?:[^<]|<\|constrain\|>)*<\|message\|>",
    max_marker_chars=96,
)

PLAIN = FormatProfile(
    name="plain",
    description="plain instruct model: the answer line (Final answer: / The answer is / \\boxed) starts the "
    "summary, else the last paragraph",
    answer_line=r"(?i)final answer\s{0,8}[:：]|the (?:final )?answer is|\\boxed\{",  # no lookahead: streamable
    last_paragraph=True,
    max_marker_chars=24,
    prompt_style="plain",
    instruction=(
        "Solve the problem step by step, one short sentence per step. "
        "End with a last line of the form 'Final answer: <answer>'."
    ),
)

PROFILES: dict[str, FormatProfile] = {p.name: p for p in (THINK, HARMONY, PLAIN)}


def register_profile(profile: FormatProfile) -> FormatProfile:
    """Make a trace format known by its name (to ``get_profile``, ``--profile``, the graders' summary markers and
    the benchmark prompts); refuses a name that is taken by another profile."""
    if not isinstance(profile, FormatProfile):
        raise StepscopeError(f"register_profile takes a FormatProfile, got {type(profile).__name__}")
    if profile.name == "auto" or (profile.name in PROFILES and PROFILES[profile.name] != profile):
        raise StepscopeError(f"a format profile named {profile.name!r} exists already; choose another name")
    for what in ("summary_after", "answer_line"):
        pattern = getattr(profile, what)
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise StepscopeError(f"format profile {profile.name!r}: {what} is not a valid regex: {e}") from None
    PROFILES[profile.name] = profile
    return profile


def profile_names() -> tuple[str, ...]:
    """Every known profile (built-ins and plug-ins), for choices and messages."""
    from . import plugins

    plugins.load("profiles")
    return tuple(PROFILES)


def get_profile(profile: str | FormatProfile | None, tokenizer=None) -> FormatProfile:
    """Resolve a profile by name, or detect it from the tokenizer when ``None``/``"auto"``."""
    if isinstance(profile, FormatProfile):
        return profile
    if profile is None or profile == "auto":
        return detect_profile(tokenizer)
    if profile not in PROFILES:
        names = profile_names()  # a plug-in may register it
        if profile not in PROFILES:
            raise StepscopeError(f"unknown trace format profile {profile!r}; choose one of {', '.join(names)} or "
                                 "'auto'")
    return PROFILES[profile]


def detect_profile(tokenizer) -> FormatProfile:
    """Guess the format from the tokenizer's vocabulary and chat template."""
    if tokenizer is None:
        return PLAIN
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # some tokenizers keep several named templates
        template = " ".join(str(t) for t in template.values())
    vocab_has = _vocab_lookup(tokenizer)
    if "<|channel|>" in template or vocab_has("<|channel|>"):
        return HARMONY
    if "</think>" in template or vocab_has("</think>"):
        return THINK
    return PLAIN


def _vocab_lookup(tokenizer):
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - any tokenizer without a materialised vocab (or none at all) checks no vocab
        vocab = {}
    added = {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    return lambda tok: tok in vocab or tok in added

