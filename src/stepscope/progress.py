"""Progress bars and status lines, always on stderr (stdout carries results only).

On a terminal a bar redraws itself in place. In a log (stderr piped or redirected) carriage-return redraws pile
up on one line that never ends, so there a bar prints a plain, complete line at most every
:data:`PLAIN_INTERVAL_S` seconds plus a last line when it closes: ``tail -f`` shows progress and ``grep`` works.
In a notebook, tqdm's widget is used as is. Status lines and warnings go through :func:`write`, which moves
live bars out of the way, so a message never lands inside a progress line.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time

__all__ = ["PLAIN_INTERVAL_S", "bar", "interactive", "phase", "write"]

PLAIN_INTERVAL_S = 10.0  # a log gets a line this often while something runs (and one at the end)
PHASE_DELAY_S = 2.0  # a step without a bar is announced once it has taken this long
# tqdm moves the cursor with these to stack nested bars; in a log they are noise
_CURSOR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PLAIN_FORMAT = "{desc}: {n_fmt}/{total_fmt} %s ({percentage:.0f}%%), {elapsed} elapsed, {remaining} left{postfix}"
_PLAIN_FORMAT_OPEN = "{desc}: {n_fmt} %s, {elapsed} elapsed{postfix}"  # total unknown


def interactive(stream=None) -> bool:
    """Whether ``stream`` (default: stderr) is a terminal, where bars may redraw in place."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Lines:
    """A file for tqdm that turns each redraw into one complete line (for logs)."""

    def __init__(self, stream):
        self.stream = stream
        self._last = ""

    def write(self, text: str) -> None:
        line = _CURSOR.sub("", str(text)).replace("\r", "").strip()
        # tqdm also writes bare "\r", "\n" and blanking spaces, and redraws the last state when it closes
        if line and line != self._last:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last = line

    def flush(self) -> None:
        self.stream.flush()


def bar(total: int | None = None, desc: str = "", unit: str = "it", *, enabled: bool = True,
        leave: bool = False, mininterval: float | None = None, **kwargs):
    """A tqdm bar on stderr: in place on a terminal, periodic plain lines in a log, the widget in a notebook.

    Takes tqdm's keyword arguments and returns a tqdm object (``update``, ``set_postfix_str``, ``close``, ...).
    ``enabled=False`` returns a disabled bar whose methods do nothing. ``mininterval``: seconds between lines in
    a log (default :data:`PLAIN_INTERVAL_S`).
    """
    # tqdm.auto is tqdm's notebook widget when run in a notebook
    from tqdm.auto import tqdm as auto_tqdm
    from tqdm.std import tqdm as std_tqdm

    if not enabled:
        return std_tqdm(total=total, disable=True)
    if any(c.__module__ == "tqdm.notebook" for c in auto_tqdm.__mro__):  # a widget: neither terminal nor log
        return auto_tqdm(total=total, desc=desc, unit=unit, leave=leave, **kwargs)
    if interactive(sys.stderr):
        return std_tqdm(total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True,
                        **({} if mininterval is None else {"mininterval": mininterval}), **kwargs)
    kwargs.pop("dynamic_ncols", None)
    kwargs.pop("file", None)
    return std_tqdm(total=total, desc=desc, unit=unit, file=_Lines(sys.stderr), leave=True, ascii=True,
                    mininterval=PLAIN_INTERVAL_S if mininterval is None else mininterval,
                    bar_format=(_PLAIN_FORMAT if total else _PLAIN_FORMAT_OPEN) % _plural(unit), **kwargs)


def _plural(unit: str) -> str:
    return unit if unit == "it" or unit.endswith("s") else unit + "s"


def write(message: str) -> None:
    """Print one line to stderr without breaking a live progress bar (bars are redrawn below it)."""
    from tqdm.std import tqdm as std_tqdm

    std_tqdm.write(message, file=sys.stderr)
    sys.stderr.flush()


@contextlib.contextmanager
def phase(what: str, enabled: bool = True, delay: float = PHASE_DELAY_S):
    """``what ...`` on stderr once a step has run ``delay`` seconds, and ``what: done in 12.3 s`` when it ends,
    for steps with no natural unit to count (writing a summary, a report). A step that ends (or fails) sooner
    prints nothing, so quick commands and one-line errors stay quiet."""
    if not enabled:
        yield
        return
    t0 = time.perf_counter()
    announced = threading.Event()

    def announce():
        announced.set()
        write(f"{what} ...")

    timer = threading.Timer(delay, announce)
    timer.daemon = True
    timer.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        timer.cancel()
        if ok and announced.is_set():
            write(f"{what}: done in {time.perf_counter() - t0:.1f} s")
