"""Each warning once per run, and how often it came at the end.

A run over fifty problems used to print "the response has no summary" for every trace that lacked one, in the
middle of a progress line. Under :func:`once_per_run` (the command line wraps every command in it) the first
occurrence of each message is printed as one line, between progress lines; repeats are only counted, and the
counts are printed when the run ends::

    warning: 37 responses have no summary (no answer line and a single paragraph: no summary)

The library itself keeps raising ordinary Python warnings; this only decides how a run shows them.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator

__all__ = ["WarningTally", "once_per_run"]

# Message heads (as trace.py words them) whose repeats read better as a count of things than as "N times".
PLURALS = {
    "the response has no summary": "responses have no summary",
    "the response has no thinking steps": "responses have no thinking steps",
    "the trace has no response tokens": "traces have no response tokens",
}


class WarningTally:
    """Counts warnings by their text; prints each text once through ``emit`` (default: stderr, between bars)."""

    def __init__(self, emit: Callable[[str], None] | None = None):
        self.counts: dict[str, int] = {}
        self._emit = emit

    def emit(self, line: str) -> None:
        if self._emit is not None:
            self._emit(line)
        else:
            from .progress import write

            write(line)

    def record(self, message: str) -> bool:
        """Count ``message``; True the first time it is seen (the time to show it)."""
        text = " ".join(str(message).split())  # one line, whatever the message's own wrapping
        self.counts[text] = self.counts.get(text, 0) + 1
        return self.counts[text] == 1

    def showwarning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """A ``warnings.showwarning`` replacement: the first of each text as ``warning: ...``, repeats counted."""
        if self.record(str(message)):
            self.emit(f"warning: {' '.join(str(message).split())}")
        _forward_to_recorder(message, category, filename, lineno, file, line)

    def repeated(self) -> list[str]:
        """One line per message seen more than once, with its count (in the order first seen)."""
        return [f"warning: {_counted(text, n)}" for text, n in self.counts.items() if n > 1]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _forward_to_recorder(message, category, filename, lineno, file, line) -> None:
    """Hand the warning on when an enclosing ``catch_warnings(record=True)`` (``pytest.warns``, a caller's own
    recorder) collects warnings: replacing ``showwarning`` would otherwise hide them from it. The stock display
    (a write to stderr) is not called: that is the one this module replaces."""
    impl = getattr(warnings, "_showwarnmsg_impl", None)
    stock = getattr(impl, "__module__", None) == "warnings" and getattr(impl, "__name__", "") == "_showwarnmsg_impl"
    if impl is not None and not stock:
        impl(warnings.WarningMessage(message, category, filename, lineno, file, line))


def _counted(text: str, n: int) -> str:
    for head, plural in PLURALS.items():
        if text == head or text.startswith((head + ":", head + " (")):
            note = text[len(head):].lstrip(":").strip()
            if note.startswith("(") and note.endswith(")"):
                note = note[1:-1]
            return f"{n} {plural}" + (f" ({note})" if note else "")
    return f"{text} ({n} times)"


@contextlib.contextmanager
def once_per_run(emit: Callable[[str], None] | None = None) -> Iterator[WarningTally]:
    """Within the block, Python warnings are shown once per text and counted; on leaving it, the counts of
    repeated ones are printed. Filters are restored afterwards."""
    tally = WarningTally(emit)
    with warnings.catch_warnings():
        if not sys.warnoptions:  # -W / PYTHONWARNINGS given by the user keep their say
            # every repeat must reach the tally to be counted (the "default" action hides repeats per line);
            # only UserWarning, ours: categories Python ignores by default (deprecations) stay ignored
            warnings.filterwarnings("always", category=UserWarning)
        warnings.showwarning = tally.showwarning
        try:
            yield tally
        finally:
            for line in tally.repeated():
                tally.emit(line)
