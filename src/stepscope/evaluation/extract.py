"""Answer extraction: the final answer (or the code) a response states, per grader kind."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from ..errors import StepscopeError
from ..profiles import PROFILES
from .datasets import Problem
from .grader_inputs import ChoiceTask

__all__ = [
    "clean_answer",
    "extract_answer",
    "first_expression",
    "last_boxed",
    "numeric_value",
    "strip_special_tokens",
]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# "Final answer: X", "final answer is X", "the answer is X" -- but not "the final answer to the problem is X",
# whose X the last-number fallback finds. Used as is by the exact and reasoning-gym graders (whole line).
_FINAL_LINE = re.compile(
    r"(?im)(?:final\s+answer\s*(?:is\b|[:：])|(?:the\s+)?(?:final\s+)?answer\s+is\b)\s*[:：]?\s*(.+?)\s*$"
)
# special tokens such as <|im_end|> or <｜end▁of▁sentence｜> are not part of an answer
_SPECIAL_TOKEN = re.compile(r"<\|[^|>\s]{1,40}\|>|<｜[^｜>]{1,40}｜>")
_ANSWER_TAG = re.compile(r"(?is)<answer>(.*?)</answer>")
# where the summary starts, as the format profiles define it (</think>, the harmony final channel)


@functools.lru_cache(maxsize=8)
def _markers(patterns: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    return tuple(re.compile(p) for p in patterns)


def _summary_markers() -> tuple[re.Pattern, ...]:
    """Every known format's summary marker (registered profiles included), compiled once per set."""
    return _markers(tuple(p.summary_after for p in PROFILES.values() if p.summary_after))

_FENCE = re.compile(r"```([^\n`]*)\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_LIKE = re.compile(r"(?m)^\s*(?:def |class |import |from \S+ import )")


def strip_special_tokens(text: str) -> str:
    """``text`` without chat special tokens such as <|im_end|> (what decoding with skip_special_tokens gives)."""
    return _SPECIAL_TOKEN.sub("", text)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` whose braces balance (nested braces allowed)."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            char = text[pos]
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return text[start:pos].strip()
    return None


def _regions(response: str) -> list[str]:
    """The summary after a thinking marker first (where the answer belongs), then the whole response."""
    for marker in _summary_markers():
        found = list(marker.finditer(response))
        if found:
            return [response[found[-1].end():], response]
    return [response]


def clean_answer(answer: str) -> str:
    """Strip markdown, quotes, dollar signs and a trailing full stop from an answer written in prose."""
    answer = answer.strip().strip("*'\"`").strip().rstrip(".").strip().strip("'\"`").strip()
    if answer.startswith("$") and answer.endswith("$") and len(answer) > 1:
        answer = answer.strip("$").strip()
    return answer.rstrip(".").strip()


def _final_line(text: str) -> str | None:
    matches = [m.group(1) for m in _FINAL_LINE.finditer(text) if clean_answer(m.group(1))]
    if not matches:
        return None
    answer = clean_answer(matches[-1])
    # "Final answer: 4 - 1 = 3" states the result after the last "=" (but keep "x = 3"-style text intact)
    if "=" in answer and "\\" not in answer:
        rhs = clean_answer(answer.rsplit("=", 1)[1])
        if rhs:
            return rhs
    return answer


def _last_line(text: str) -> str | None:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _first_found(text: str, *finders: Callable[[str], str | None]) -> str | None:
    for region in _regions(text):
        region = _SPECIAL_TOKEN.sub("", region)
        for finder in finders:
            found = finder(region)
            if found:
                return found
    return None


# --- math: the first complete expression after an answer marker --------------------------------------------

# Markers after which a math answer is stated; "####" is GSM8K's own marker, which small models imitate.
_MATH_MARKER = re.compile(
    r"(?im)(?:\bfinal\s+answer\s*(?:is\b|[:：=])"
    r"|\b(?:the\s+)?(?:final\s+)?answer\s+(?:is|(?:would|will|should|must)\s+be)\b"
    r"|(?<![\w-])answer\s*[:：]|^[ \t]*#{4}(?!#))"
)
_DASHES = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-", "\uff1a": ":"})
# a number as written in prose: sign, currency, thousands by comma or by (thin / no-break) space, decimals, a/b
_NUM = (r"[-+]?[$€£¥]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d{1,3}(?:[ \u00a0\u2009\u202f]\d{3})+(?![\d,])|\d+)"
        r"(?:\.\d+)?(?:/\d+(?![\d.]))?|[-+]?\.\d+")
_LEAD_NUM = re.compile(rf"(?:{_NUM})")
_LEAD_FRAC = re.compile(r"-?\\[dt]?frac\{[^{}]*\}\{[^{}]*\}")
_NUM_LIST_SEP = re.compile(r"\s*(?:,\s*(?:and\s+|or\s+)?|\s(?:and|or)\s+)")
_TIME = re.compile(r"\d{1,2}:\d{2}(?::\d{2})?(?:\s*[aApP]\.?\s?[mM]\b\.?)?")
_INLINE_MATH = re.compile(r"\$\$(.+?)\$\$|\$(?!\s)([^$]+?)(?<!\s)\$(?!\d)|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox|textnormal)\s*\{([^{}]*)\}")
# a parenthetical of prose ("(two)", "(in dollars)"), not of math ("(x+1)", "(2, 3)")
_PROSE_PAREN = re.compile(r"\(\s*[A-Za-z][A-Za-z .,'-]*[A-Za-z.]\s*\)")
# words that make a following number part of an expression rather than a quantity with a unit
_MATH_WORDS = frozenset({
    "pi", "e", "i", "x", "y", "z", "n", "k", "sqrt", "log", "ln", "sin", "cos", "tan",
    "times", "plus", "minus", "over", "divided", "cdot", "mod",
})
# the clause ends here: a sentence end, a subordinate clause, or a following check / explanation
_CLAUSE_END_WORDS = re.compile(
    r"\s+(?:because|since|as|which|so|where|when|given|if|but|hence|thus|therefore|then|check|checking|note|"
    r"verification|verify|explanation|this|that|for)\b", re.IGNORECASE)
_ABBREVIATIONS = ("approx", "e.g", "i.e", "vs", "etc", "ca", "resp", "no", "mr", "mrs", "ms", "dr", "st")
_FILLER = re.compile(r"(?i)^(?:(?:(?:approximately|about|around|roughly|exactly|just|only|simply|equal\s+to|equals|"
                     r"given\s+by|that)\b|approx\.|≈|~|=)\s*)+")
_OPENERS, _CLOSERS = "([{", ")]}"


def _span_after(text: str, start: int) -> str:
    """The text from the marker on, or from the next non-blank line when the marker ends its line."""
    rest = text[start:]
    line, _, after = rest.partition("\n")
    # the whole rest: the clause stops at the line end, but display math may run over several lines
    return rest if line.strip(" \t*_:：") else after.lstrip()


def _clause(text: str) -> str:
    """``text`` up to the first sentence end, subordinate clause or check at bracket depth 0."""
    depth = 0
    for pos, char in enumerate(text):
        if char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth = max(0, depth - 1)
        if depth:
            continue
        nxt = text[pos + 1:pos + 2]
        if char in "\n;!?" or (char == "<" and re.match(r"</?[A-Za-z|｜]", text[pos:pos + 3])):  # or a tag
            return text[:pos]
        if char == "." and (not nxt or nxt.isspace()):
            word = re.search(r"([A-Za-z.]+)$", text[:pos])
            if word and word.group(1).lower().rstrip(".") in _ABBREVIATIONS:
                continue
            return text[:pos]
        if char == ":" and (not nxt or nxt.isspace()):
            return text[:pos]
        if char == "," and re.match(r"\s*(?!(?:and|or)\s+[-+$\d])[A-Za-z]{2,}", text[pos + 1:]):
            return text[:pos]
        if char.isspace():
            ends = _CLAUSE_END_WORDS.match(text, pos)
            if ends:
                return text[:pos]
    return text


def _plain_number(token: str) -> str:
    """``-$1,000.5`` -> ``-1000.5``: a number token without its currency sign and thousands separators."""
    return re.sub(r"[$€£¥,\s\u00a0\u2009\u202f+]", "", token)


def _unit_follows(rest: str) -> bool:
    """Whether ``rest`` (what follows a number) starts with a unit or a prose parenthetical, not with math."""
    rest = _TEXT_CMD.sub(r" \1 ", rest)
    if re.match(r"\s*(?:\^\s*\{?\\circ\}?|°)", rest):
        return True
    if _PROSE_PAREN.match(rest.lstrip()) and rest[:1].isspace():
        return True
    word = re.match(r"\s+([A-Za-z][A-Za-z'-]*)", rest)
    return word is not None and word.group(1).lower() not in _MATH_WORDS


def _trim(expr: str) -> str:
    """Strip quotes, markdown and trailing punctuation until nothing changes."""
    while True:
        trimmed = expr.strip().strip("*_`\"'“”‘’").rstrip(".,;:!").strip()
        if trimmed == expr:
            return expr
        expr = trimmed


def _as_float(token: str) -> float | None:
    try:
        if "/" in token:
            num, den = token.split("/")
            return float(num) / float(den)
        return float(token)
    except (ValueError, ZeroDivisionError):
        return None


def _depth0(expr: str, char: str) -> list[int]:
    """Positions of ``char`` outside brackets."""
    depth, found = 0, []
    for pos, c in enumerate(expr):
        depth += (c in _OPENERS) - (c in _CLOSERS)
        if c == char and depth <= 0:
            found.append(pos)
    return found


_ASSIGNMENT = re.compile(r"[A-Za-z]\w*\s*=\s*(.+)")
_PERCENT = re.compile(r"\s*(?:%|\\%|percent\b)")


def _same_value(a: tuple[str, bool], b: tuple[str, bool]) -> bool:
    """Whether two (number, is-percent) items state one value: "1/4" and "25%", "0.5" and "1/2"."""
    x, y = _as_float(a[0]), _as_float(b[0])
    return x is not None and y is not None and abs(x / (100 if a[1] else 1) - y / (100 if b[1] else 1)) < 1e-9


def _numbers_at_start(expr: str) -> tuple[list[str], str] | None:
    """``"2 and 3 apples"`` -> (["2", "3"], " apples"): the numbers a clause opens with, and what follows them.

    A restatement joined by "or" ("1/4 or 25%", "0.5 or 1/2") is one value; other lists are several answers.
    None when the clause does not open with a number, or the number is part of an expression ("3x + 1").
    """
    items: list[tuple[str, bool]] = []
    rest, joined_by_or = expr, False
    lead = _LEAD_NUM.match(rest)
    while lead:
        after = rest[lead.end():]
        pct = _PERCENT.match(after)
        if pct:
            after = after[pct.end():]
        if after[:1] and (after[:1].isalnum() or after[:1] in "^_(\\"):
            if not items:
                return None  # "3x", "2^{10}": an expression, not a list of numbers
            break
        item = (_plain_number(lead.group(0)), bool(pct))
        if not (joined_by_or and _same_value(items[0], item)):
            items.append(item)
        rest = after
        sep = _NUM_LIST_SEP.match(rest)
        lead = _LEAD_NUM.match(rest, sep.end()) if sep else None
        if sep and lead:
            joined_by_or = "or" in sep.group(0)
            rest = rest[sep.end():]
            lead = _LEAD_NUM.match(rest)
    if not items:
        return None
    return [v + ("%" if p else "") for v, p in items], rest


def _reduce(expr: str) -> str:
    """The first complete expression of a clause: a number loses its unit, words before a lone number go."""
    expr = _trim(re.sub(r"^(?i:negative)\s+(?=\d)", "-", _FILLER.sub("", _trim(expr))))
    parts = [p.strip() for p in re.split(r",|\bor\b|\band\b", expr)]
    assignments = [m for m in (_ASSIGNMENT.fullmatch(p) for p in parts) if m]
    if len(parts) > 1 and len(assignments) == len(parts) and "\\" not in expr:  # "x = 2 or x = -3": the solutions
        return ", ".join(_reduce(m.group(1)) for m in assignments)
    equals = _depth0(expr, "=")
    if equals and "\\" not in expr and not re.search(r"[<>≤≥]", expr):
        # "4 - 1 = 3" states its result last; "4.5 hours = 4 hours 30 minutes" is stated first
        head = expr[:equals[0]]
        expr = _trim(head if numeric_value(head) is not None else expr[equals[-1] + 1:])
    time = _TIME.match(expr)
    if time and (time.end() == len(expr) or not expr[time.end()].isdigit()):
        return time.group(0).strip()
    frac = _LEAD_FRAC.match(expr)
    if frac:
        rest = expr[frac.end():]
        return frac.group(0) if not rest.strip() or _unit_follows(rest) else expr
    numbers = _numbers_at_start(expr)
    if numbers:
        values, rest = numbers
        # what follows is a unit, a parenthetical in words ("7 (since 3 + 4 = 7)") or nothing: the numbers
        if not rest.strip() or _unit_follows(rest) or re.match(r"\s+\([A-Za-z]{2,}", rest):
            return ", ".join(values)
        return expr
    # prose before a single number: "that she has 12 apples" -> 12
    if re.match(r"[A-Za-z]{2,}\s", expr) and expr.split()[0].lower() not in _MATH_WORDS:
        found = list(_LEAD_NUM.finditer(expr))
        starts = [m for m in found if m.start() == 0 or not expr[m.start() - 1].isalnum()]
        if len(starts) == 1 and "\\" not in expr:
            return _reduce(expr[starts[0].start():])
    return expr


def first_expression(span: str) -> str | None:
    """The first complete expression stated in ``span`` (the text after an answer marker), else None.

    "7. Check: 7 - 3 = 4." -> "7"; "8 apples, which is 2 more than 6." -> "8"; "12 dollars" -> "12";
    "2 (two) hours" -> "2"; "1 000" -> "1000"; "3:30 p.m." stays whole; "$\\frac{1}{2}$ cup" -> "\\frac{1}{2}".
    """
    text = span.translate(_DASHES).replace("**", "").replace("__", "").replace("\\$", "")
    text = re.sub(r"(?<=\d)\\[,!;: ](?=\d)|(?<=\d)\{,\}(?=\d)", lambda m: "" if "\\" in m.group(0) else ",", text)
    text = text.strip().lstrip(":").strip()
    math = _INLINE_MATH.match(text)
    if math:
        inner = next(g for g in math.groups() if g is not None)
        reduced = _reduce(_TEXT_CMD.sub(lambda m: " " + m.group(1) if m.group(1).strip() else "", inner))
        return reduced or None
    time = _TIME.match(text)
    if time and not text[time.end():time.end() + 1].isdigit():
        return time.group(0).strip()
    return _reduce(_clause(text)) or None


_UNIT_LETTERS = frozenset(["m", "g", "s", "h", "l", "L", "K", "A", "V", "W", "J", "N"])


def _unit_tail(rest: str) -> bool:
    """Whether ``rest`` (after a number) is only a percent sign, degrees, units and prose parentheticals."""
    rest = re.sub(r"^\s*(?:%|percent\b|\^\s*\{?\\circ\}?|°)", "", rest)
    rest = _trim(_PROSE_PAREN.sub(" ", rest))
    if not rest:
        return True
    if not re.fullmatch(r"[A-Za-z][A-Za-z.'/-]*(?:\^\{?\d\}?)?(?:\s+[A-Za-z][A-Za-z.'/-]*(?:\^\{?\d\}?)?)*", rest):
        return False
    first = rest.split()[0]
    if len(first) == 1 and first not in _UNIT_LETTERS:  # "2a", "3 x": algebra, not a unit
        return False
    return first.lower() not in _MATH_WORDS


def numeric_value(text: str) -> float | None:
    """The value of ``text`` when it states one number, with or without a unit, a currency or percent sign or a
    prose parenthetical ("9 (apples)", "$12", "12 dollars", "25\\%", "1 000", "\\frac{3}{4}"), else None."""
    t = _TEXT_CMD.sub(lambda m: " " + m.group(1), text.translate(_DASHES))
    t = re.sub(r"(?<=\d)(?:\\[,!;: ]|\{,\})(?=\d)", lambda m: "," if "," in m.group(0) else "", t)
    t = re.sub(r"\\[,!;: ]|~|\\left|\\right|\\!", " ", t).replace("\\%", "%").replace("\\$", "$")
    t = _trim(re.sub(r"^\s*[A-Za-z]\w*\s*=\s*", "", t.replace("$", " ").replace("**", "")))
    t = re.sub(r"^[$€£¥]\s*", "", t)
    frac = re.match(r"(-?)\\[dt]?frac\{\s*(\d+(?:\.\d+)?)\s*\}\{\s*(\d+(?:\.\d+)?)\s*\}", t)
    lead = None if frac else _LEAD_NUM.match(t)
    found = frac or lead
    if found is None or not _unit_tail(t[found.end():]):
        return None
    try:
        if frac:
            value = float(frac.group(2)) / float(frac.group(3))
            return -value if frac.group(1) else value
        token = _plain_number(found.group(0))  # no fraction: ``found`` is ``lead``
        if "/" in token:
            num, den = token.split("/")
            return float(num) / float(den)
        return float(token)
    except (ValueError, ZeroDivisionError):
        return None


def _after_marker(text: str) -> str | None:
    """The answer after the last answer marker that states one."""
    for match in reversed(list(_MATH_MARKER.finditer(text))):
        found = first_expression(_span_after(text, match.end()))
        if found:
            return found
    return None


def _last_math_number(text: str) -> str | None:
    found = _last_number(text.translate(_DASHES))
    return found.lstrip("+") if found else None


def _extract_math(problem: Problem, response: str) -> str | None:
    return _first_found(response, last_boxed, _after_marker, _last_math_number)


def _looks_numeric(text: str) -> bool:
    return bool(re.fullmatch(r"\s*-?[\d,]*\.?\d+\s*", text))


def _extract_rg(problem: Problem, response: str) -> str | None:
    def answer_tag(text: str) -> str | None:
        found = _ANSWER_TAG.findall(text)
        return found[-1].strip() if found else None

    fallback = _last_number if _looks_numeric(problem.answer) else _last_line
    return _first_found(response, last_boxed, answer_tag, _final_line, fallback)


def _letters(problem: Problem) -> str:
    return str(problem.task.letters) if isinstance(problem.task, ChoiceTask) else "ABCD"


# Words after which a capital "A" (or a lower-case letter) is an option, not the article: "A because ...".
_AFTER_LETTER = frozenset({
    "because", "since", "as", "which", "is", "was", "and", "or", "but", "so", "for", "given", "due", "with",
    "here", "this", "it", "seems", "appears", "would", "should", "must", "will", "fits", "matches", "holds",
    "satisfies", "gives",
})
_OPEN_WRAP = r"[\s*_\"'“”‘’`$(\[]*(?:\\text(?:bf)?\{)?[\s(]*"
_CLOSE_WRAP = r"\}?[*_\"'“”‘’`$)\]]*"
# "final answer is", "answer:", "the correct option is", "I pick", "we choose" (then "option"/"letter" may follow)
_CHOICE_MARKER = (
    r"(?:\b(?:final\s+answer|(?:correct|best|right)\s+(?:answer|option|choice)|answer)"
    r"(?:\s*(?:is|would\s+be|will\s+be|must\s+be|should\s+be|=|:|：))?"
    r"|\b(?:I|we)(?:\s+would|\s+will|'ll|'d)?\s+(?:pick|choose|select|go\s+with|opt\s+for))"
    r"\s*[:：]?\s*(?:(?:option|choice|letter)\s+)?"
)


def _alone(text: str, start: int, end: int, letter: str) -> bool:
    """Whether the letter ``text[start:end]`` stands alone as an answer (not the article "A", not "a bit")."""
    before, after = text[max(0, start - 1):start], text[end:]
    wrapped = bool(before) and before in "(*\"'“‘`$[{"
    if wrapped or not after or re.match(r"\s*(?:$|[.,;:!?)\]}\n*\"'”’`$])", after):
        return True
    word = re.match(r"\s+([A-Za-z]+)", after)
    if word:
        if word.group(1).lower() in _AFTER_LETTER:
            return True
        # only "A" (and lower-case letters) double as English words; "B careful" does not occur
        return letter.isupper() and letter not in "AI"
    return letter.isupper() and bool(re.match(r"\s+\d", after))


def _extract_choice(problem: Problem, response: str) -> str | None:
    """The chosen option letter: \\boxed{C}, "Final answer: D", "The answer is \\"C\\".", "I pick D", "D is correct",
    **B**, a letter that opens a line ("C) because ..."), (B), or a line that is just the letter."""
    letters = _letters(problem)
    upper, lower = re.escape(letters.upper()), re.escape(letters.lower())
    any_case = f"[{upper}{lower}]"

    def from_boxed(text: str) -> str | None:
        content = last_boxed(text)
        if content is None:
            return None
        content = re.sub(r"\\text(?:bf)?\{([^}]*)\}", r"\1", content)
        found = re.match(rf"^[\s(\[*]*({any_case})(?:[\s)\].:*]|$)", content)
        return found.group(1) if found else None

    marker = re.compile(rf"(?i:{_CHOICE_MARKER}){_OPEN_WRAP}({any_case})(?![A-Za-z0-9]){_CLOSE_WRAP}")
    verdict = re.compile(rf"(?<![A-Za-z])(?:(?i:option|choice)\s+)?\(?([{upper}])\)?\s+(?:is|seems|appears)\s+"
                         rf"(?:to\s+be\s+)?(?:the\s+)?(?:correct|right|best|true)\b")

    def from_answer_phrase(text: str) -> str | None:
        hits = []
        for match in marker.finditer(text):
            if _alone(text, match.start(1), match.end(), match.group(1)):
                hits.append((match.start(1), match.group(1)))
        hits += [(m.start(1), m.group(1)) for m in verdict.finditer(text)]
        return max(hits)[1] if hits else None

    def from_bold(text: str) -> str | None:
        hits = re.findall(rf"\*\*\s*\(?([{upper}])\)?[.:]?\s*\*\*", text)
        return hits[-1] if hits else None

    def from_quotes(text: str) -> str | None:
        hits = re.findall(rf"[\"“'‘`]([{upper}])[\"”'’`]", text)
        return hits[-1] if hits else None

    def from_sentence_end(text: str) -> str | None:
        # "I think it's B.": a letter that ends a sentence after "is" (never the article, which needs a noun)
        hits = re.findall(rf"(?im)\b(?:is|it's|be)\s+(?:(?:option|choice)\s+)?\(?([{upper}])\)?(?=\s*(?:[.!;]|$))",
                          text)
        return hits[-1].upper() if hits else None

    def from_line_start(text: str) -> str | None:
        # "C) because ...", "C. The energy ...": one letter opening its line; several are a restated option list
        hits = set(re.findall(rf"(?m)^[ \t>*#-]*\(?([{upper}])\s*[).:](?:\s|$)", text))
        return hits.pop() if len(hits) == 1 else None

    def from_parens(text: str) -> str | None:
        hits = re.findall(rf"\(([{upper}])\)", text)
        return hits[-1] if hits else None

    def from_lone_line(text: str) -> str | None:
        hits = re.findall(rf"(?m)^\s*(?:(?i:option|choice)\s+)?\(?([{upper}])[.)]?\s*$", text)
        return hits[-1] if hits else None

    found = _first_found(response, from_boxed, from_answer_phrase, from_bold, from_quotes, from_sentence_end,
                         from_line_start, from_parens, from_lone_line)
    return found.upper() if found else None


def _extract_code(problem: Problem, response: str) -> str | None:
    """The last ```python block, else the last fenced block, else the response itself if it is code."""
    blocks = _FENCE.findall(response)
    python_blocks = [body for lang, body in blocks if lang.strip().lower() in ("python", "py", "python3")]
    for candidates in (python_blocks, [body for _, body in blocks]):
        nonempty = [body for body in candidates if body.strip()]
        if nonempty:
            return nonempty[-1].strip("\n")
    region = _regions(response)[0]
    return region.strip("\n") if _CODE_LIKE.search(region) else None


def _extract_exact(problem: Problem, response: str) -> str | None:
    return _first_found(response, _final_line, _last_line)


_EXTRACTORS: dict[str, Callable[[Problem, str], str | None]] = {
    "math": _extract_math,
    "choice": _extract_choice,
    "code": _extract_code,
    "exact": _extract_exact,
    "rg": _extract_rg,
}


def extract_answer(problem: Problem, response: str) -> str | None:
    """Read the final answer (or the code) out of a response, the way the problem's grader expects it."""
    try:
        extractor = _EXTRACTORS[problem.grader]
    except KeyError:
        raise StepscopeError(f"unknown grader {problem.grader!r}; choose one of {', '.join(_EXTRACTORS)}") from None
    return extractor(problem, response or "")


