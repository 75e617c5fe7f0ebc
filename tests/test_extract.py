"""Answer extraction: the first complete expression after a marker, numbers with units, option letters."""

from __future__ import annotations

import pytest

from stepscope.evaluation.datasets import Problem
from stepscope.evaluation.extract import extract_answer, first_expression, numeric_value


def math_problem(answer: str = "0") -> Problem:
    return Problem("m/0", "q", answer, "math", {})


def choice_problem(letters: str | None = None) -> Problem:
    return Problem("c/0", "q", "B", "choice", {"choices": letters} if letters else {})


# --- math: where the answer after a marker ends ----------------------------------------------------------


@pytest.mark.parametrize(
    "response,expected",
    [
        ("The answer is 7. Check: 7 - 3 = 4.", "7"),  # a following check is not the answer
        ("The answer is 8 apples, which is 2 more than 6.", "8"),
        ("So the answer is 12 because 3 * 4 = 12 and nothing else.", "12"),
        ("Final answer: 12 dollars", "12"),
        ("Final answer: 2 (two) hours", "2"),
        ("Final answer: 1 000", "1000"),
        ("The answer is 1\u2009000 people.", "1000"),  # thin-space thousands
        ("The answer is 1,250,000.", "1250000"),
        ("Final answer: 3:30 p.m.", "3:30 p.m."),
        ("They meet at 3:30 p.m. Final answer: 3:30 p.m. Check: 2 h after 1:30 p.m.", "3:30 p.m."),
        ("The answer is -5.", "-5"),
        ("The answer is \u22125 degrees.", "-5"),  # a unicode minus
        ("The answer is 25%.", "25%"),
        ("The answer is $\\frac{3}{4}$ of a cup.", "\\frac{3}{4}"),
        ("The answer is \\frac{3}{4}, since half of 3/2 is that.", "\\frac{3}{4}"),
        ("The answer is $(-\\infty, 3]$.", "(-\\infty, 3]"),
        ("The answer is (2, 5].", "(2, 5]"),
        ("The answer is 2 and 3.", "2, 3"),  # several solutions are one answer
        ("Final answer: 4 - 1 = 3", "3"),
        ("The final answer is: **42**", "42"),
        ("Final answer: $12.50 per hour", "12.50"),
        ("The answer is approximately 5 km.", "5"),
        ("The answer is that she has 12 apples left.", "12"),
        ("The answer is x = 5.", "5"),
        ("The answer is 2x + 1.", "2x + 1"),
        ("Final answer:\n\n$$\n42\n$$", "42"),
        ("#### 500", "500"),  # GSM8K's own marker
        ("Final answer: 500 meters.\n#### 500\nThe answer is: 540", "540"),  # the last marker counts
        ("The answer is 5! That was easy.", "5"),
        ("The answer is Friday.", "Friday"),
        ("The answer is x = 3 or x = -2.", "3, -2"),  # the solutions of an equation
        ("The answer is 4.5 hours = 4 hours 30 minutes.", "4.5"),  # a quantity restated after '='
        ("The answer is 7 (since 3 + 4 = 7).", "7"),  # a reason in parentheses
        ("The answer is 1/4 or 25%.", "1/4"),  # one value stated twice
        ("The answer is 2 or 3.", "2, 3"),  # two values
        ("So the answer is $\\$12$.", "12"),
        ("The answer is 3 \u00d7 4 = 12.", "12"),
        ("Final Answer: The final answer is 7. I hope it is correct.", "7"),
        ("The answer is \u2248 3.14.", "3.14"),
        ("The answer should be 9.", "9"),
    ],
)
def test_answer_after_a_marker_is_the_first_complete_expression(response, expected):
    assert extract_answer(math_problem(), response) == expected


@pytest.mark.parametrize(
    "response,expected",
    [
        ("We try 4, then 6.\n\\boxed{6} is it. The answer is 5.", "6"),  # \boxed{} outranks prose
        ("She has 3 apples and buys 4 more, so 7 in all", "7"),  # no marker: the last number
        ("<think>The answer is 4. Wait, 5.</think>The answer is 5.", "5"),  # the summary after </think>
        ("<think>Let me count: 1, 2, 3. The answer is 3.</think>", "3"),  # empty summary: the thinking
        ("<think>unfinished 4 and then 9", "9"),  # cut off inside the thinking
        ("The answer is 11.<|im_end|>", "11"),
    ],
)
def test_math_answer_sources_in_order(response, expected):
    assert extract_answer(math_problem(), response) == expected


@pytest.mark.parametrize("final", ["<|channel|>final<|message|>", "<|channel|>final <|constrain|>json<|message|>"])
def test_harmony_summary_is_found_where_the_format_profile_puts_it(final):
    # the summary markers are the profiles' (one regex for the segmenter, the tracker and extraction)
    response = f"<|channel|>analysis<|message|>Maybe 4. The answer is 4.<|end|><|start|>assistant{final}It is 5."
    assert extract_answer(math_problem(), response) == "5"


def test_first_expression_returns_none_for_an_empty_span():
    assert first_expression("   ") is None
    assert first_expression(". Then more") is None


# --- numbers as stated, with their units ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text,value",
    [
        ("9 (apples)", 9.0),
        ("$12", 12.0),
        ("\\$12.50", 12.5),
        ("12 dollars", 12.0),
        ("2 (two) hours", 2.0),
        ("1 000", 1000.0),
        ("1{,}000", 1000.0),
        ("1\\,000", 1000.0),
        ("25\\%", 25.0),
        ("30^\\circ", 30.0),
        ("\\frac{3}{4}", 0.75),
        ("-\\frac{1}{2}", -0.5),
        ("3/4", 0.75),
        ("5 \\text{ cm}", 5.0),
        ("x = 5", 5.0),
        ("\u22127", -7.0),
    ],
)
def test_numeric_value_reads_one_number_with_its_unit(text, value):
    assert numeric_value(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["3:30 p.m.", "2a", "3 x", "3\\sqrt{2}", "2\\pi", "10^{3}", "12, 15", "(x+1)",
                                  "Friday", "12 dollars and 50 cents", ""])
def test_numeric_value_refuses_what_is_not_one_number(text):
    assert numeric_value(text) is None


# --- option letters -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response,letter",
    [
        ("C) because the energy is conserved.", "C"),
        ("C. The energy of the ground state is lowest.", "C"),
        ("D: it has the most bonds.", "D"),
        ('The answer is "C".', "C"),
        ("The answer is \u201cB\u201d.", "B"),
        ("Among A, B, C and D, I pick D.", "D"),
        ("The answer: A careful analysis shows that D is correct.", "D"),  # the article A is no option
        ("The answer is A because it is the largest.", "A"),  # but A before 'because' is
        ("The answer is A.", "A"),
        ("Final answer: B, since the others fail.", "B"),
        ("The correct answer is option C.", "C"),
        ("Answer: $C$", "C"),
        ("The answer is \\textbf{B}.", "B"),
        ("Option B is incorrect, so the answer is A.", "A"),
        ("A is correct.", "A"),
        ("We choose C.", "C"),
        ("<think>It could be (A). No.</think>\nThe answer is D.", "D"),
        ("the answer is a bit unclear; final answer: (b)", "B"),
        ("Final answer: E", "E"),  # with five options
        ("Looking at the spectra, I think it's B.", "B"),
        ("Answer: The correct answer is C.", "C"),
        ("Correct option: B", "B"),
        ("**B) 12 m/s**", "B"),
        ("The last step rules out the rest.\nOption C", "C"),
    ],
)
def test_choice_letter_extraction(response, letter):
    assert extract_answer(choice_problem("ABCDE"), response) == letter


@pytest.mark.parametrize(
    "response",
    [
        "The answer: A careful look is needed.",  # only the article
        "A) 1 m\nB) 2 m\nC) 3 m\nD) 4 m",  # the options restated, none chosen
        "The answer is a matter of taste.",
        "I cannot decide.",
        "Final answer: E",  # not an option of a four-option question
    ],
)
def test_no_letter_where_none_stands_alone(response):
    assert extract_answer(choice_problem(), response) is None
