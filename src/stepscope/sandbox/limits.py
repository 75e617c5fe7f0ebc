"""Resource limits of a sandboxed run and the code that applies them in the child between fork and exec."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import StepscopeError
from .seccomp import Prepared

__all__ = ["Identity", "Limits", "make_preexec", "rlimits"]


@dataclass(frozen=True)
class Limits:
    """What one run may use. ``cpu_s`` defaults to ``timeout_s + 1``; sizes in MiB."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    cpu_s: float | None = None
    max_file_mb: int = 16
    max_disk_mb: int = 64
    max_procs: int = 32
    max_output_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if (self.timeout_s <= 0 or self.memory_mb <= 0 or self.max_file_mb < 0 or self.max_procs < 0
                or self.max_disk_mb <= 0 or self.max_output_bytes < 0 or (self.cpu_s is not None and self.cpu_s <= 0)):
            raise StepscopeError("sandbox limits must be positive: check the --timeout / --memory-mb settings")


@dataclass(frozen=True)
class Identity:
    """The unprivileged uid/gid a root caller drops the program to."""

    uid: int
    gid: int


def rlimits(limits: Limits, identity: Identity | None, extra_procs: int = 0) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) triples, computed in the parent (no work after fork)."""
    cpu = int(max(1, round(limits.cpu_s if limits.cpu_s is not None else limits.timeout_s + 1)))
    triples = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, limits.memory_mb << 20, limits.memory_mb << 20),
        (resource.RLIMIT_FSIZE, limits.max_file_mb << 20, limits.max_file_mb << 20),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NOFILE, 256, 256),
    ]
    if identity is not None:
        # a fresh uid owns nothing yet, so the count is exactly the program's processes (plus the wrapper's)
        nproc = limits.max_procs + 1 + extra_procs
        triples.append((resource.RLIMIT_NPROC, nproc, nproc))
    elif os.geteuid() != 0:
        # per user: allow what the user already runs plus ours (weaker, stated in the isolation string)
        nproc = _user_process_count(os.getuid()) + limits.max_procs + extra_procs
        triples.append((resource.RLIMIT_NPROC, nproc, nproc))
    return triples


def _user_process_count(uid: int) -> int:
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                count += os.stat(f"/proc/{name}").st_uid == uid
            except OSError:
                pass
    return count


def make_preexec(
    triples: list[tuple[int, int, int]],
    identity: Identity | None,
    network_filter: Prepared | None,
) -> Callable[[], None]:
    """The function run in the child after fork: limits, then the uid drop, then death signal and seccomp.

    The parent-death signal is set after the uid change because changing credentials clears it. A failure
    to drop privileges or to install a requested filter ends the child (exit 126) rather than running the
    program with less isolation than the run reports.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None

    def preexec() -> None:
        for which, soft, hard in triples:
            try:
                _cur_soft, cur_hard = resource.getrlimit(which)
                if cur_hard != resource.RLIM_INFINITY:
                    hard = min(hard, cur_hard)
                    soft = min(soft, hard)
                resource.setrlimit(which, (soft, hard))
            except (ValueError, OSError):
                pass
        try:
            if identity is not None:
                os.setgroups([])
                os.setresgid(identity.gid, identity.gid, identity.gid)
                os.setresuid(identity.uid, identity.uid, identity.uid)
            if prctl is not None:
                prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the thread that started us
            if network_filter is not None and not network_filter.apply():
                os._exit(126)
        except OSError:
            os._exit(126)

    return preexec
