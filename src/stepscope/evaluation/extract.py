"""Answer extraction: the final answer (or the code) a response states, per grader kind."""

from __future__ import annotations

import re
from typing import Callable

from ..errors import StepscopeError
from .datasets import Problem

__all__ = ["extract_answer", "last_boxed", "clean_answer"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# "Final answer: X", "final answer is X", "the answer is X" -- but not "the final answer to the problem is X",
# whose X the last-number fallback finds
_FINAL_LINE = re.compile(
    r"(?im)(?:final\s+answer\s*(?:is\b|[:：])|(?:the\s+)?(?:final\s+)?answer\s+is\b)\s*[:：]?\s*(.+?)\s*$"
)
# special tokens such as <|im_end|> or <｜end▁of▁sentence｜> are not part of an answer
_SPECIAL_TOKEN = re.compile(r"<\|[^|>\s]{1,40}\|>|<｜[^｜>]{1,40}｜>")
_ANSWER_TAG = re.compile(r"(?is)<answer>(.*?)</answer>")
_SUMMARY_MARKERS = (re.compile(r"</think>"), re.compile(r"<\|channel\|>final.*?<\|message\|>", re.S))
_FENCE = re.compile(r"```([^\n`]*)\n(.*?)(?:```|\Z)", re.S)
_CODE_LIKE = re.compile(r"(?m)^\s*(?:def |class |import |from \S+ import )")


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
    for marker in _SUMMARY_MARKERS:
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


def _extract_math(problem: Problem, response: str) -> str | None:
    return _first_found(response, last_boxed, _final_line, _last_number)


def _looks_numeric(text: str) -> bool:
    return bool(re.fullmatch(r"\s*-?[\d,]*\.?\d+\s*", text))


def _extract_rg(problem: Problem, response: str) -> str | None:
    def answer_tag(text: str) -> str | None:
        found = _ANSWER_TAG.findall(text)
        return found[-1].strip() if found else None

    fallback = _last_number if _looks_numeric(problem.answer) else _last_line
    return _first_found(response, last_boxed, answer_tag, _final_line, fallback)


def _letters(problem: Problem) -> str:
    return str(problem.meta.get("choices", "ABCD"))


def _extract_choice(problem: Problem, response: str) -> str | None:
    """The chosen option letter, robust to (B), answer: b, **B**, \\boxed{C}, Final answer: D."""
    letters = _letters(problem)
    upper, lower = re.escape(letters.upper()), re.escape(letters.lower())

    def from_boxed(text: str) -> str | None:
        content = last_boxed(text)
        if content is None:
            return None
        content = re.sub(r"\\text(?:bf)?\{([^}]*)\}", r"\1", content)
        found = re.match(rf"^[\s(\[*]*([{upper}{lower}])(?:[\s)\].:*]|$)", content)
        return found.group(1) if found else None

    def from_answer_phrase(text: str) -> str | None:
        pattern = re.compile(
            rf"(?i)(?:final\s+answer|answer|option|choice)\s*(?:is|would\s+be|:|：)?\s*[:：]?\s*"
            rf"(?:\*\*|\$)?\s*[(\[]?\s*([{upper}{lower}])\s*[)\]]?(?:\*\*|\$)?(?=\s*(?:$|[.,;:!\n]|\s))"
        )
        hits = []
        for match in pattern.finditer(text):
            letter = match.group(1)
            if letter.islower():  # 'the answer is a bit' must not read as A
                rest = text[match.end():match.end() + 3]
                if rest.strip() and rest.strip()[0].isalpha():
                    continue
            hits.append(letter)
        return hits[-1] if hits else None

    def from_bold(text: str) -> str | None:
        hits = re.findall(rf"\*\*\s*\(?([{upper}])\)?[.:]?\s*\*\*", text)
        return hits[-1] if hits else None

    def from_parens(text: str) -> str | None:
        hits = re.findall(rf"\(([{upper}])\)", text)
        return hits[-1] if hits else None

    def from_lone_line(text: str) -> str | None:
        hits = re.findall(rf"(?m)^\s*([{upper}])[.)]?\s*$", text)
        return hits[-1] if hits else None

    found = _first_found(response, from_boxed, from_answer_phrase, from_bold, from_parens, from_lone_line)
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


