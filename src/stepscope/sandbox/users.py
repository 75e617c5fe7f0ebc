"""An unprivileged user id per sandboxed run, and what it lets us do: per-run process limits and a full kill.

Run as root, model code would ignore ``RLIMIT_NPROC`` (never enforced for root), could read every process's
environment through ``/proc`` and write anywhere. So a root caller drops the sandboxed process to a fresh,
otherwise unused uid (and the same gid, no supplementary groups). Every process the program starts then
shares that uid, which gives a complete kill (every process of the uid) and a complete clean-up (every file
the uid owns in the world-writable temporary folders) without tracking the process tree.
"""

from __future__ import annotations

import os
import random
import signal
import stat
import time

__all__ = ["WORLD_WRITABLE_DIRS", "can_execute", "kill_uid", "pick_uid", "processes_of", "remove_files_of"]

# A block of uids far from system and login ranges (and from the 100000+ ranges of /etc/subuid).
_UID_BASE = 1_900_000_000
_UID_SPAN = 1 << 24

WORLD_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


def _real_uid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def processes_of(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is ``uid``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _real_uid(name) == uid:
            try:
                with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as fh:
                    state = fh.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state not in ("Z", "X"):
                found.append(int(name))
    return found


def pick_uid() -> int:
    """A uid that no running process uses (the run's own identity)."""
    rng = random.SystemRandom()
    for _ in range(32):
        uid = _UID_BASE + rng.randrange(_UID_SPAN)
        if not processes_of(uid):
            return uid
    raise OSError("could not find an unused uid for the sandbox")


def kill_uid(uid: int, timeout_s: float = 2.0) -> bool:
    """SIGKILL every process of ``uid`` until none is left (a fork storm races the scan); True when done."""
    end = time.monotonic() + timeout_s
    while True:
        pids = processes_of(uid)
        if not pids:
            return True
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if time.monotonic() > end:
            return not processes_of(uid)
        time.sleep(0.01)


def remove_files_of(uid: int, dirs: tuple[str, ...] = WORLD_WRITABLE_DIRS, max_entries: int = 100_000) -> int:
    """Delete what ``uid`` left in world-writable folders (without a private /tmp it may write there)."""
    removed = 0
    for top in dirs:
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        stack = entries
        seen = 0
        while stack and seen < max_entries:
            entry = stack.pop()
            seen += 1
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if info.st_uid == uid:
                removed += _remove(entry.path, info)
            elif stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_IWOTH:
                try:  # a shared folder (like /tmp itself): look inside for the uid's entries
                    stack.extend(os.scandir(entry.path))
                except OSError:
                    pass
    return removed


def _remove(path: str, info: os.stat_result) -> int:
    import shutil

    try:
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
        return 1
    except OSError:
        return 0


def can_execute(path: str, uid: int, gid: int) -> bool:
    """Whether a process of ``uid``/``gid`` (no other groups) could execute ``path`` (every folder searchable)."""
    path = os.path.realpath(path)
    parts = path.split("/")
    for depth in range(1, len(parts) + 1):
        target = "/".join(parts[:depth]) or "/"
        try:
            info = os.stat(target)
        except OSError:
            return False
        if info.st_uid == uid:
            bit = stat.S_IXUSR
        elif info.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return False
    return True
