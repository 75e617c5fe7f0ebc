"""Which part of a run a process does: a :class:`Shard` takes every problem with ``index % count == index`` and
writes its own results file (``results.jsonl`` alone, ``results.shard-I-of-N.jsonl`` among several)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import StepscopeError

__all__ = ["RESULTS_NAME", "SHARD_FILE", "WHOLE_RUN", "Shard", "parse_shard"]

RESULTS_NAME = "results.jsonl"  # the results file of a run that is not split
SHARD_FILE = re.compile(r"results\.shard-(\d+)-of-(\d+)\.jsonl")


@dataclass(frozen=True)
class Shard:
    """Problems with ``index % count == index`` of the list belong to this process."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise StepscopeError(f"bad shard {self.index}/{self.count}: need 0 <= i < n, e.g. --shard 0/4")

    def takes(self, problem_index: int) -> bool:
        return problem_index % self.count == self.index

    @property
    def results_name(self) -> str:
        return RESULTS_NAME if self.count == 1 else f"results.shard-{self.index}-of-{self.count}.jsonl"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE_RUN = Shard()  # the one shard of a run that is not split


def parse_shard(text: str) -> Shard:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match:
        raise StepscopeError(f"bad --shard {text!r}: write I/N with 0 <= I < N, e.g. --shard 0/4")
    return Shard(int(match.group(1)), int(match.group(2)))
