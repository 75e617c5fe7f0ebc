"""The progress bar of an eval run: samples done, problems done, samples per second and accuracy per condition."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .run_config import RunConfig
    from .runner import _Unit

__all__ = ["RunProgress"]


class RunProgress:
    """A bar (:func:`stepscope.progress.bar`) over this shard's samples with problems done, samples/s and accuracy
    per condition."""

    def __init__(self, units: Sequence[_Unit], config: RunConfig, done: Iterable[dict], enabled: bool):
        names = [c.name for c in config.conditions]
        ids = {u.problem.id for u in units}
        self._per_problem = len(names) * config.sampling.n
        self._left: dict[str, int] = dict.fromkeys(ids, self._per_problem)
        self._right = dict.fromkeys(names, 0)
        self._seen = dict.fromkeys(names, 0)
        for record in done:
            if record["problem_id"] in ids and record["condition"] in self._right:
                self._count(record)
        self._written, self._t0 = 0, time.perf_counter()
        self._bar = None
        if enabled:
            from .. import progress  # on stderr; plain periodic lines when stderr is a log

            total = len(units) * len(names)
            self._bar = progress.bar(total, "eval", "sample", initial=sum(self._seen.values()))
            self._bar.set_postfix_str(self._postfix(), refresh=False)

    def _count(self, record: Mapping[str, Any]) -> None:
        self._seen[record["condition"]] += 1
        self._right[record["condition"]] += bool(record["correct"])
        self._left[record["problem_id"]] -= 1

    def _postfix(self) -> str:
        done = sum(1 for v in self._left.values() if v <= 0)
        rate = self._written / max(time.perf_counter() - self._t0, 1e-9)
        acc = " ".join(f"{n} {100 * self._right[n] / self._seen[n]:.1f}%" if self._seen[n] else f"{n} -"
                       for n in self._right)
        return f"problems {done}/{len(self._left)}, {rate:.2f} samples/s, acc {acc}"

    def update(self, record: Mapping[str, Any]) -> None:
        self._count(record)
        self._written += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(self._postfix(), refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
