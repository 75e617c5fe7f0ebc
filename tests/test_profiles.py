"""Trace format profiles: the built-ins and one registered by a user (one FormatProfile and a registration)."""

from __future__ import annotations

import pytest

import stepscope
from stepscope import profiles
from stepscope.cli.common import profile_choices
from stepscope.errors import StepscopeError
from stepscope.evaluation import extract
from stepscope.evaluation.datasets import INSTRUCTIONS, Problem, build_user_message

REASONING = profiles.FormatProfile(
    name="reasoning_tags",
    description="<reasoning> ... </reasoning> then the answer",
    summary_after=r"</reasoning>",
    max_marker_chars=16,
)


@pytest.fixture
def registered():
    profiles.register_profile(REASONING)
    yield REASONING
    profiles.PROFILES.pop(REASONING.name, None)


def test_builtin_profiles_carry_their_prompt_style():
    assert set(INSTRUCTIONS) == set(profiles.PROMPT_STYLES)  # every style has its instructions
    assert {name: p.prompt_style for name, p in profiles.PROFILES.items() if name in ("think", "harmony", "plain")} \
        == {"think": "think", "harmony": "think", "plain": "plain"}


def test_a_registered_profile_is_known_everywhere(registered, tokenizers):
    assert stepscope.get_profile("reasoning_tags") is REASONING
    assert "reasoning_tags" in profile_choices()
    # segmentation: the marker ends the thinking, the answer after it is the summary
    trace = stepscope.Trace.from_text(tokenizers["plain"], "What is 2+3?",
                                      "First add 2 and 3. That gives 5.</reasoning>The answer is 5.",
                                      profile="reasoning_tags")
    kinds = [s.kind for s in trace.steps]
    assert kinds[0] == "question" and kinds[-1] == "summary" and kinds.count("thinking") == 2, kinds
    assert trace.steps_of("summary")[0].text.strip() == "The answer is 5."
    # grading looks for the answer after the new marker first
    problem = Problem("p/0", "What is 2+3?", "5", "exact", {})
    assert extract.extract_answer(problem, "maybe 4?</reasoning>\nFinal answer: 5") == "5"
    # prompts follow the profile's style
    assert build_user_message(problem, REASONING).endswith(INSTRUCTIONS["think"]["exact"])
    assert build_user_message(problem, "reasoning_tags").endswith(INSTRUCTIONS["think"]["exact"])


def test_registration_refuses_what_could_not_work():
    with pytest.raises(StepscopeError, match="exists already"):
        profiles.register_profile(profiles.FormatProfile("plain", "another plain", summary_after="x"))
    with pytest.raises(StepscopeError, match="not a valid regex"):
        profiles.register_profile(profiles.FormatProfile("broken", "bad regex", summary_after="(unclosed"))
    with pytest.raises(StepscopeError, match="no way to find the summary"):
        profiles.FormatProfile("nothing", "no marker")
    with pytest.raises(StepscopeError, match="prompt_style"):
        profiles.FormatProfile("odd", "odd style", summary_after="x", prompt_style="poetic")
    with pytest.raises(StepscopeError, match="unknown trace format profile 'nope'"):
        profiles.get_profile("nope")
    profiles.register_profile(profiles.PLAIN)  # the same profile again is no clash
