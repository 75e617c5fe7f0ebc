"""Isolation backends, strongest first, and the command line each one runs a program with.

- ``bwrap`` (bubblewrap): new user, pid, network, ipc and uts namespaces; a root file system holding only
  the system's read-only program folders and the interpreter; a size-limited private tmpfs as the working
  directory and ``/tmp`` (the only writable path); ``/proc`` of its own pid namespace; dies with its parent.
- ``unshare``: user, network and pid namespaces from util-linux ``unshare``; the host file system is visible
  (with the unprivileged uid's permissions).
- ``rlimit``: no namespaces (the usual container case); a seccomp filter removes sockets, the uid drop keeps
  other processes' ``/proc`` entries and files out of reach, a uid-wide kill ends every descendant.

Every backend adds the resource limits and, for a root caller, the drop to a fresh unprivileged uid.
``STEPSCOPE_SANDBOX`` (``auto``, ``bwrap``, ``unshare``, ``rlimit``) chooses one by hand.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import StepscopeError
from . import seccomp

__all__ = ["BACKENDS", "ENV_VAR", "Plan", "candidate_plans", "interpreter_candidates"]

BACKENDS = ("bwrap", "unshare", "rlimit")
ENV_VAR = "STEPSCOPE_SANDBOX"

# Inside the bubblewrap root: where the program's files are (read-only) and its working directory.
BOX_INPUT = "/sandbox/in"
BOX_WORK = "/sandbox/work"

# Inside a PID namespace made by unshare the program must not be PID 1 (PID 1 ignores default-action
# signals), so a tiny shell waits for it and reports a signal death as 128 + signal number.
_PID1_SHELL = ("/bin/sh", "-c", '"$@"; exit $?', "sh")

_UNSHARE_FLAGS: tuple[tuple[str, ...], ...] = (
    ("-r", "-n", "-p", "-f", "--kill-child"),  # user + network + pid namespace
    ("-n", "-p", "-f", "--kill-child"),  # root without user namespaces
)

_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime", "/etc/alternatives")


@dataclass(frozen=True)
class Plan:
    """How one run is isolated: the backend, what it gives, and the pieces of its command line."""

    backend: str
    features: tuple[str, ...]
    wrapper: tuple[str, ...] = ()
    extra_procs: int = 0  # processes the wrapper itself keeps under the program's uid
    network_filter: bool = False
    pid_namespace: bool = False

    @property
    def description(self) -> str:
        """For result files and the eval banner, e.g. ``bwrap+uid+userns+pidns+netns+readonly-fs``."""
        return "+".join((self.backend, *self.features))


def interpreter_candidates() -> list[str]:
    """Python interpreters to run model code with, this one's base install first (no virtual environment)."""
    found = []
    for path in (os.path.realpath(sys.executable), shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin")):
        if path and os.path.realpath(path) not in found:
            found.append(os.path.realpath(path))
    return found


def requested_backend(env: Mapping[str, str] | None = None) -> str:
    value = (env if env is not None else os.environ).get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in ("auto", *BACKENDS):
        raise StepscopeError(f"{ENV_VAR}={value!r} is not a sandbox backend; choose auto, {', '.join(BACKENDS)}")
    return value


def candidate_plans(dropped_uid: bool) -> list[Plan]:
    """Every plan this machine might support, strongest first (each is probed before use)."""
    uid = ("uid",) if dropped_uid else ()
    plans = []
    bwrap = shutil.which("bwrap")
    if bwrap:
        # without the uid drop (no interpreter the fresh uid can reach) root keeps only the bound paths
        for feats in ((uid,) if not uid else (uid, ())):
            plans.append(Plan("bwrap", (*feats, "userns", "pidns", "netns", "readonly-fs", "private-tmp"),
                              (bwrap,), extra_procs=2, pid_namespace=True))
    unshare = shutil.which("unshare")
    if unshare:
        for flags in _UNSHARE_FLAGS:
            feats = (*uid, *(["userns"] if "-r" in flags else []), "pidns", "netns")
            plans.append(Plan("unshare", feats, (unshare, *flags), extra_procs=2, pid_namespace=True))
    if seccomp.supported():
        plans.append(Plan("rlimit", (*uid, "seccomp-net"), network_filter=True))
    plans.append(Plan("rlimit", (*uid, "socket-guard")))
    return plans


def bwrap_command(plan: Plan, interpreter: str, input_dir: str, env: Mapping[str, str], max_disk_mb: int,
                  script: str, args: Sequence[str]) -> list[str]:
    """The bubblewrap command line: a minimal read-only root, a private work tmpfs, all namespaces."""
    cmd = [*plan.wrapper, "--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
           "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv"]
    for key, value in env.items():
        cmd += ["--setenv", key, value]
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            cmd += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            cmd += ["--ro-bind", path, path]
    for path in _SYSTEM_FILES:
        cmd += ["--ro-bind-try", path, path]
    prefix = os.path.dirname(os.path.dirname(interpreter))  # <prefix>/bin/python3.x
    if not any(prefix == d or prefix.startswith(d + "/") for d in _SYSTEM_DIRS):
        cmd += ["--ro-bind", prefix, prefix]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--ro-bind", input_dir, BOX_INPUT,
            "--size", str(max_disk_mb << 20), "--tmpfs", BOX_WORK, "--symlink", BOX_WORK, "/tmp",
            "--remount-ro", "/", "--chdir", BOX_WORK, "--", interpreter, "-I", f"{BOX_INPUT}/{script}", *args]
    return cmd


def plain_command(plan: Plan, interpreter: str, script_path: str, args: Sequence[str]) -> list[str]:
    """The command line of the ``unshare`` and ``rlimit`` backends (the host file system stays visible)."""
    if plan.backend == "unshare":
        return [*plan.wrapper, *_PID1_SHELL, interpreter, "-I", script_path, *args]
    if "socket-guard" in plan.features:
        return [interpreter, "-I", "-c", SOCKET_GUARD, script_path, *args]
    return [interpreter, "-I", script_path, *args]


# Last resort where neither namespaces nor seccomp exist: plain Python code cannot open a socket, but
# ctypes or a subprocess can (the isolation string says "socket-guard", so a run records how weak it was).
SOCKET_GUARD = """\
import _socket, socket, sys, runpy
def _stepscope_no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the stepscope sandbox")
class _StepscopeNoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        _stepscope_no_network()
socket.socket = _StepscopeNoSocket
_socket.socket = _StepscopeNoSocket
socket.create_connection = _stepscope_no_network
socket.fromfd = _stepscope_no_network
del _StepscopeNoSocket, _stepscope_no_network
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
