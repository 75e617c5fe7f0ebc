"""Run untrusted Python (model-written code) in a separate, limited, disposable process.

Layers, each best-effort on its own and together enough for benchmark grading (not a security boundary
against a determined attacker; run evaluations as an unprivileged user on a machine you can lose):

- a fresh temporary working directory, removed afterwards; ``python -I`` (isolated mode); a scrubbed
  environment (no HOME secrets, no proxies, no tokens);
- resource limits set in the child before ``exec``: CPU time, address space, file size, core dumps, open
  files and, for non-root users, the number of processes (``RLIMIT_NPROC`` is per user and never binds
  for root);
- its own session and process group, killed as a whole (``os.killpg``) when it exits and at the wall-clock
  limit; the child also dies with the thread that started it (``PR_SET_PDEATHSIG``);
- when ``unshare`` can create user, network and PID namespaces (probed once and cached): no network
  interface but loopback, and every descendant, even one that left the process group, dies with the
  sandbox. Without namespaces a guard makes ``socket.socket`` raise, which plain Python code cannot get
  around but ``ctypes`` or a subprocess can.
"""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

from .errors import StepscopeError

__all__ = ["SandboxResult", "run_python", "isolation_mode", "STATUSES", "TEMP_PREFIX"]

TEMP_PREFIX = "stepscope-sandbox-"
STATUSES = ("ok", "error", "timeout", "cpu", "memory", "file_size", "killed", "start_failed")

# Candidate namespace wrappers, strongest first; the first one that runs ``true`` is used.
_NAMESPACE_WRAPPERS: tuple[tuple[str, ...], ...] = (
    ("-r", "-n", "-p", "-f", "--kill-child"),  # user + network + pid namespace
    ("-n", "-p", "-f", "--kill-child"),  # the same for root where user namespaces are off
    ("-r", "-n"),
    ("-n",),
)

# Inside a PID namespace the program must not be PID 1 (PID 1 ignores its own default-action signals),
# so a tiny shell waits for it and reports a signal death as 128 + signal number.
_PID1_SHELL = ("/bin/sh", "-c", '"$@"; exit $?', "sh")

# Prepended (through -c, so the program's own line numbers stay right) when no network namespace exists.
_SOCKET_GUARD = """\
import _socket, socket, sys, runpy
def _stepscope_no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the stepscope sandbox")
class _StepscopeNoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        _stepscope_no_network()
socket.socket = _StepscopeNoSocket
_socket.socket = _StepscopeNoSocket
socket.create_connection = _stepscope_no_network
socket.socketpair = _stepscope_no_network
socket.fromfd = _stepscope_no_network
del _StepscopeNoSocket, _stepscope_no_network
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run did: ``ok`` only for a clean exit with status 0 inside every limit."""

    ok: bool
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    truncated: bool = False
    isolation: str = ""


@functools.lru_cache(maxsize=1)
def _namespace_prefix() -> tuple[str, ...] | None:
    """The ``unshare`` command line that works on this machine (probed once), or None."""
    exe = shutil.which("unshare")
    if exe is None:
        return None
    for flags in _NAMESPACE_WRAPPERS:
        prefix = (exe, *flags)
        cmd = [*prefix, *(_PID1_SHELL if "-p" in flags else ()), "true"]
        try:
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return prefix
    return None


def isolation_mode() -> str:
    """Describe the isolation this machine gives, for result files and ``doctor`` output."""
    prefix = _namespace_prefix()
    if prefix is None:
        return "socket-guard"
    flags = set(prefix[1:])
    parts = ["netns"]
    if "-p" in flags:
        parts.append("pidns")
    if "-r" in flags:
        parts.append("userns")
    return "+".join(parts)


def _user_process_count(uid: int) -> int:
    """Processes owned by ``uid`` now; RLIMIT_NPROC counts them all, not only the sandbox's."""
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                count += os.stat(f"/proc/{name}").st_uid == uid
            except OSError:
                pass
    return count


def _limits(timeout_s: float, memory_mb: int, cpu_s: float | None, max_file_mb: int, max_procs: int):
    """Resource limits as (resource, soft, hard) triples, computed in the parent (no work after fork)."""
    cpu = int(max(1, round(cpu_s if cpu_s is not None else timeout_s + 1)))
    limits = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, memory_mb << 20, memory_mb << 20),
        (resource.RLIMIT_FSIZE, max_file_mb << 20, max_file_mb << 20),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NOFILE, 256, 256),
    ]
    if os.geteuid() != 0:  # per user and ignored for root; allow what the user already runs plus ours
        nproc = _user_process_count(os.getuid()) + max_procs
        limits.append((resource.RLIMIT_NPROC, nproc, nproc))
    return limits


def _make_preexec(limits):
    """The function run in the child between fork and exec: only async-signal-safe-ish calls."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None

    def preexec() -> None:
        if prctl is not None:
            prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the thread that started us
        for which, soft, hard in limits:
            try:
                cur_soft, cur_hard = resource.getrlimit(which)
                if cur_hard != resource.RLIM_INFINITY:
                    hard = min(hard, cur_hard)
                    soft = min(soft, hard)
                resource.setrlimit(which, (soft, hard))
            except (ValueError, OSError):
                pass

    return preexec


def _scrubbed_env(workdir: str) -> dict[str, str]:
    """A minimal environment: nothing of the caller's (tokens, proxies, HOME) leaks into the program."""
    return {
        "PATH": _SAFE_PATH,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _command(script: str, args: Sequence[str]) -> tuple[list[str], str]:
    """The full command line and a name for the isolation it gives."""
    prefix = _namespace_prefix()
    if prefix is None:
        return [sys.executable, "-I", "-c", _SOCKET_GUARD, script, *args], "socket-guard"
    shell = list(_PID1_SHELL) if "-p" in prefix else []
    return [*prefix, *shell, sys.executable, "-I", script, *args], isolation_mode()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as fh:
            return [int(x) for x in fh.read().split()]
    except (OSError, ValueError):
        return []


def _live_group_members(pgid: int) -> list[int] | None:
    """Members of a process group that are not zombies (from /proc), or None where /proc cannot tell."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    live = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            live.append(int(name))
    return live


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _terminate(proc: subprocess.Popen, namespaced_pid1: bool) -> int | None:
    """Kill everything the program started and reap the direct child; returns its exit status.

    In a PID namespace the namespace's init is killed first, so that the kernel kills every process in
    the namespace and ``unshare`` can still reap it (an orphaned init would linger as a zombie under a
    host init that does not reap).
    """
    if namespaced_pid1 and proc.poll() is None:
        for child in _children(proc.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc.pid)  # the session and group id are the child's pid; this also ends leftovers
    try:
        returncode = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not delivered
        returncode = None
    end = time.monotonic() + 1.0
    while time.monotonic() < end:  # members may have forked while the first kill landed
        live = _live_group_members(proc.pid)
        if live is not None and not live:
            break
        _kill_group(proc.pid)
        time.sleep(0.01)
    return returncode


def _collect(proc: subprocess.Popen, deadline: float, max_output_bytes: int):
    """Read both pipes with a size cap until the process exits or the deadline passes."""
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    truncated = False
    sel = selectors.DefaultSelector()
    for stream in buffers:
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    timed_out = False
    exited_at: float | None = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # descendants may hold the pipes open; they are killed next
            if exited_at is None and now >= deadline:
                timed_out = True
                break
            for key, _ in sel.select(timeout=0.05 if exited_at is not None else min(0.2, deadline - now)):
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = buffers[key.fileobj]
                room = max_output_bytes - len(buf)
                if len(chunk) > room:
                    truncated = True
                buf += chunk[: max(room, 0)]
    finally:
        sel.close()
    return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), truncated, timed_out


def _signal_of(returncode: int | None, namespaced_pid1: bool) -> int | None:
    """The signal that ended the program, if any (a shell in a PID namespace reports it as 128 + n)."""
    if returncode is None:
        return None
    if returncode < 0:
        return -returncode
    if namespaced_pid1 and 128 < returncode < 128 + 65:
        return returncode - 128
    return None


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _classify(returncode: int | None, stderr: str, timed_out: bool, namespaced_pid1: bool) -> str:
    """Map how the process ended to one status word."""
    if timed_out:
        return "timeout"
    sig = _signal_of(returncode, namespaced_pid1)
    if sig == signal.SIGXCPU:
        return "cpu"
    if sig == signal.SIGXFSZ:
        return "file_size"
    if returncode == 0:
        return "ok"
    last = _last_line(stderr)
    if last.startswith("MemoryError"):
        return "memory"
    if "[Errno 27]" in last or "File too large" in last:
        return "file_size"
    if sig is not None:
        return "killed"
    return "error"


def _remove_tree(path: str) -> None:
    """Remove the work directory even if the program took write permission off its own folders."""

    def onerror(func, target, _exc):
        try:
            os.chmod(os.path.dirname(target), 0o700)
            os.chmod(target, 0o700)
            func(target)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=onerror)
    else:
        shutil.rmtree(path, onerror=onerror)


def run_python(
    source: str,
    *,
    timeout_s: float = 10,
    memory_mb: int = 1024,
    cpu_s: float | None = None,
    max_file_mb: int = 16,
    max_procs: int = 32,
    max_output_bytes: int = 1 << 20,
    args: Sequence[str] = (),
) -> SandboxResult:
    """Run ``source`` as a Python script under limits; never raises for anything the program does.

    ``cpu_s`` defaults to ``timeout_s + 1``; ``max_procs`` is the number of extra processes a non-root user
    may start; ``args`` become ``sys.argv[1:]``. Output beyond ``max_output_bytes`` per stream is dropped
    (``truncated``). Limits are set through ``preexec_fn``, which Python warns is unsafe in heavily threaded
    programs: call this from a worker process (as :func:`~stepscope.evaluation.graders.grade_many` does).
    """
    if timeout_s <= 0 or memory_mb <= 0 or max_file_mb < 0 or max_procs < 0:
        raise StepscopeError("sandbox limits must be positive: check --timeout / --memory-mb settings")
    limits = _limits(timeout_s, memory_mb, cpu_s, max_file_mb, max_procs)
    workdir = tempfile.mkdtemp(prefix=TEMP_PREFIX)
    start = time.monotonic()
    try:
        os.chmod(workdir, 0o700)
        script = os.path.join(workdir, "main.py")
        with open(script, "w", encoding="utf-8") as fh:
            fh.write(source)
        cmd, isolation = _command(script, args)
        namespaced_pid1 = "pidns" in isolation
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=workdir,
                env=_scrubbed_env(workdir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
                preexec_fn=_make_preexec(limits),
            )
        except OSError as exc:
            return SandboxResult(False, "start_failed", None, "", f"could not start the sandbox: {exc}",
                                 time.monotonic() - start, isolation=isolation)
        try:
            out, err, truncated, timed_out = _collect(proc, start + timeout_s, max_output_bytes)
        finally:
            returncode = _terminate(proc, namespaced_pid1)
            for stream in (proc.stdout, proc.stderr):
                stream.close()
        duration = time.monotonic() - start
        stdout = out.decode("utf-8", errors="replace")
        stderr = err.decode("utf-8", errors="replace")
        status = _classify(returncode, stderr, timed_out, namespaced_pid1)
        return SandboxResult(status == "ok", status, returncode, stdout, stderr, duration, truncated, isolation)
    finally:
        _remove_tree(workdir)
