"""An isolated process pool: each item runs in a worker process; a crash or a hang fails that item only.

Math-Verify's timeouts use ``signal.alarm``, which works only on a process's main thread, and model output can
make a parser or a test program hang or crash; so grading runs here, one item at a time per worker.
"""

from __future__ import annotations

import json
import multiprocessing.connection
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["map_isolated"]


def _serve(fd: int) -> None:
    """Worker process loop: take (index, item), send back ("ok"|"err", index, value) until told to stop."""
    conn = multiprocessing.connection.Connection(fd)
    try:
        fn = conn.recv()
        conn.send(("ready", -1, None))
        while True:
            message = conn.recv()
            if message is None:
                return
            index, item = message
            try:
                reply = ("ok", index, fn(item))
            except BaseException as exc:  # noqa: BLE001 - report anything, keep serving
                reply = ("err", index, f"{type(exc).__name__}: {exc}")
            conn.send(reply)
    except (EOFError, OSError, KeyboardInterrupt):
        return


# Worker start-up: the parent's sys.path, and the package registered without running its __init__ (which
# imports torch; grading does not need it, and a fresh worker after each crash or hang should start fast).
_WORKER_BOOT = """
import importlib.util, json, sys, types
sys.path[:] = json.loads(sys.argv[2])
spec = importlib.util.find_spec("stepscope")
package = types.ModuleType("stepscope")
package.__path__ = list(spec.submodule_search_locations)
sys.modules["stepscope"] = package
from stepscope.sandbox.pool import _serve
_serve(int(sys.argv[1]))
"""


@dataclass
class _Slot:
    process: subprocess.Popen
    conn: multiprocessing.connection.Connection
    born: float
    ready: bool = False
    index: int | None = None
    started: float = 0.0


def _spawn(fn: Callable[[Any], Any]) -> _Slot:
    """Start a fresh interpreter as a worker (no multiprocessing: no re-import of the caller's __main__)."""
    ours, theirs = socket.socketpair()
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, str(theirs.fileno()), json.dumps(sys.path)],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
    finally:
        theirs.close()
    conn = multiprocessing.connection.Connection(ours.detach())
    conn.send(fn)
    return _Slot(process, conn, time.monotonic())


def _stop(slot: _Slot) -> None:
    if slot.process.poll() is None:
        slot.process.kill()
    try:
        slot.process.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not delivered
        pass
    slot.conn.close()


def map_isolated(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    workers: int,
    deadline_s: float,
    startup_s: float = 120.0,
) -> list[tuple[bool, Any]]:
    """Apply ``fn`` to each item in worker processes; a crash or overrun fails that item only.

    Returns ``(True, value)`` or ``(False, reason)`` per item, in order. ``fn`` must be picklable (a
    module-level function). Workers that die are replaced; if workers cannot start at all, the remaining
    items run in this process.
    """
    results: list[tuple[bool, Any] | None] = [None] * len(items)
    pending = deque(range(len(items)))
    slots: list[_Slot] = []
    start_failures = 0
    try:
        slots = [_spawn(fn) for _ in range(min(workers, len(items)))]
        while slots and (pending or any(s.index is not None for s in slots)):
            for slot in slots:
                if slot.ready and slot.index is None and pending:
                    slot.index = pending.popleft()
                    slot.started = time.monotonic()
                    slot.conn.send((slot.index, items[slot.index]))
            limits = [s.started + deadline_s if s.index is not None else s.born + startup_s
                      for s in slots if s.index is not None or not s.ready]
            wait_s = max(0.0, min(limits) - time.monotonic()) if limits else None
            ready = multiprocessing.connection.wait([s.conn for s in slots], timeout=wait_s)
            for slot in list(slots):
                reason = None
                if slot.conn in ready:
                    try:
                        kind, index, value = slot.conn.recv()
                    except (EOFError, OSError):
                        slot.process.wait(timeout=5)
                        reason = f"the grading process died (exit code {slot.process.returncode})"
                    else:
                        if kind == "ready":
                            slot.ready = True
                        else:
                            results[index] = (kind == "ok", value)
                            slot.index = None
                elif slot.index is not None and time.monotonic() > slot.started + deadline_s:
                    reason = f"grading took longer than {deadline_s:.0f} s and was stopped"
                elif not slot.ready and time.monotonic() > slot.born + startup_s:
                    reason = "a grading process did not start"
                if reason is None:
                    continue
                _stop(slot)
                slots.remove(slot)
                if slot.index is not None:
                    results[slot.index] = (False, reason)
                elif not slot.ready:
                    start_failures += 1
                if pending and start_failures < 3:
                    slots.append(_spawn(fn))
    finally:
        for slot in slots:
            try:
                slot.conn.send(None)
            except (OSError, ValueError):
                pass
            _stop(slot)
    for index in pending:  # workers could not start: run the rest here
        try:
            results[index] = (True, fn(items[index]))
        except Exception as exc:  # noqa: BLE001 - a failing item is its result, as in the workers
            results[index] = (False, f"{type(exc).__name__}: {exc}")
    return [r if r is not None else (False, "not graded") for r in results]


