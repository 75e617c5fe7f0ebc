"""Run untrusted Python (model-written code) in a separate, limited, disposable process.

What a run gets (see :mod:`.backends` for each backend and docs/evaluation.md for the threat model):
the strongest isolation backend that works on this machine (probed once), resource limits (CPU time,
address space, file size, core dumps, open files, processes), a scrubbed environment, a private working
directory removed afterwards, for a root caller a fresh unprivileged uid, and a kill of every process the
program started (its pid namespace, or every process of its uid, or its process tree) when it ends or
overruns. Optionally it gets ``stdin`` bytes and a private result channel: a pipe whose write end is the
program's file descriptor ``$STEPSCOPE_RESULT_FD``, read back as :attr:`SandboxResult.channel`; a harness
that hides that descriptor from the code it tests gets a verdict the tested code cannot write.
"""

from __future__ import annotations

import functools
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import StepscopeError
from . import backends, seccomp, users
from .backends import Plan
from .limits import Identity, Limits, make_preexec, rlimits

__all__ = ["RESULT_FD_ENV", "STATUSES", "TEMP_PREFIX", "SandboxResult", "isolation_mode", "run_python"]

TEMP_PREFIX = "stepscope-sandbox-"
RESULT_FD_ENV = "STEPSCOPE_RESULT_FD"
STATUSES = ("ok", "error", "timeout", "cpu", "memory", "file_size", "disk", "killed", "start_failed")
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_MAX_CHANNEL_BYTES = 1 << 20


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run did: ``ok`` only for a clean exit with status 0 inside every limit.

    ``ok`` says how the process ended, which the program controls; a verdict that must not be forgeable
    reads ``channel`` instead (see :func:`run_python`).
    """

    ok: bool
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    truncated: bool = False
    isolation: str = ""
    channel: bytes | None = None


# --- choosing a backend -----------------------------------------------------------------------------


def _identity(plan: Plan) -> Identity | None:
    """A fresh unprivileged uid for plans that drop a root caller's privileges, else None."""
    if "uid" not in plan.features or os.geteuid() != 0:
        return None
    uid = users.pick_uid()
    return Identity(uid, uid)


def _interpreter_for(plan: Plan, identity: Identity | None) -> str | None:
    """The first interpreter the program's uid can reach (bubblewrap, too, opens it as that uid)."""
    for path in backends.interpreter_candidates():
        if identity is None or users.can_execute(path, identity.uid, identity.gid):
            return path
    return None


@functools.cache
def _working_plans(choice: str) -> tuple[Plan, ...]:
    """The plans that run a trivial program correctly here, strongest first (probed once per process)."""
    dropped = os.geteuid() == 0
    found = []
    for plan in backends.candidate_plans(dropped):
        if choice != "auto" and plan.backend != choice:
            continue
        probe = _execute(plan, "import sys\nprint('stepscope-probe', sys.version_info[0])\n", Limits(timeout_s=10),
                         args=(), stdin=None, channel=False)
        if probe.ok and probe.stdout.strip() == "stepscope-probe 3":
            found.append(plan)
            if choice == "auto":
                break
    return tuple(found)


def _plan(backend: str | None = None) -> Plan:
    choice = backend or backends.requested_backend()
    if choice not in ("auto", *backends.BACKENDS):
        raise StepscopeError(f"unknown sandbox backend {choice!r}; choose auto, {', '.join(backends.BACKENDS)}")
    plans = _working_plans(choice)
    if not plans:
        raise StepscopeError(f"the sandbox backend {choice!r} does not work on this machine"
                             + ("" if choice == "auto" else f"; unset {backends.ENV_VAR} to use the best available"))
    return plans[0]


def isolation_mode(backend: str | None = None) -> str:
    """The isolation this machine gives model code, e.g. ``bwrap+uid+userns+pidns+netns+readonly-fs``."""
    return _plan(backend).description


# --- one run ----------------------------------------------------------------------------------------


def _scrubbed_env(workdir: str, extra: Mapping[str, str]) -> dict[str, str]:
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
        **extra,
    }


def _dir_size(path: str, cap: int) -> int:
    """Bytes under ``path``, stopping once past ``cap`` (a disk-fill guard for backends without a tmpfs)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
            if total > cap:
                return total
    return total


def _kill_everything(proc: subprocess.Popen, plan: Plan, identity: Identity | None, before: set[int]) -> int | None:
    """End the program and every process it started; returns the direct child's exit status.

    A pid namespace dies with its init; a fresh uid is killed as a whole; otherwise the process group, the
    tree below the child and the orphans re-parented to us (we are a child subreaper during such runs).
    """
    if plan.pid_namespace and proc.poll() is None:
        for child in _children(proc.pid):
            _kill(child)
    if identity is not None:
        users.kill_uid(identity.uid)
    orphans = set(_children(os.getpid())) - before - {proc.pid}
    for root in (proc.pid, *orphans):
        _kill_tree(root)
        if root != proc.pid:
            _kill(root)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        returncode = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not delivered
        returncode = None
    if identity is not None:
        users.kill_uid(identity.uid)
    for pid in set(_children(os.getpid())) - before - {proc.pid}:  # reap what we adopted
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return returncode


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as fh:
            return [int(x) for x in fh.read().split()]
    except (OSError, ValueError):
        return []


def _kill_tree(root: int) -> None:
    """SIGKILL ``root``'s descendants, deepest last found first, a few passes (they may still fork)."""
    for _ in range(5):
        stack, found = [root], []
        while stack:
            for child in _children(stack.pop()):
                found.append(child)
                stack.append(child)
        if not found:
            return
        for pid in found:
            _kill(pid)
        time.sleep(0.01)


def _set_subreaper(on: bool) -> bool:
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, int(on), 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _collect(proc: subprocess.Popen[bytes], deadline: float, limits: Limits, stdin: bytes | None,
             channel_fd: int | None, workdir: str | None):
    """Feed stdin, read stdout/stderr/channel with caps, until the process exits or a limit is hit."""
    stdout, stderr = proc.stdout, proc.stderr
    if stdout is None or stderr is None:
        raise ValueError("_collect needs a process started with stdout=PIPE and stderr=PIPE")
    out: dict[object, bytearray] = {stdout: bytearray(), stderr: bytearray()}  # keyed by the selector's file object
    chan = bytearray()
    truncated = False
    sel = selectors.DefaultSelector()
    for stream in (stdout, stderr):
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    if channel_fd is not None:
        os.set_blocking(channel_fd, False)
        sel.register(channel_fd, selectors.EVENT_READ)
    pending = memoryview(stdin or b"")
    if proc.stdin is not None:
        os.set_blocking(proc.stdin.fileno(), False)
        if pending:
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
    why: str | None = None
    exited_at: float | None = None
    next_disk_check = 0.0
    try:
        while any(key.events & selectors.EVENT_READ for key in sel.get_map().values()):
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # descendants may hold the pipes open; they are killed next
            if exited_at is None and now >= deadline:
                why = "timeout"
                break
            if workdir is not None and now >= next_disk_check:
                next_disk_check = now + 0.1
                if _dir_size(workdir, limits.max_disk_mb << 20) > limits.max_disk_mb << 20:
                    why = "disk"
                    break
            timeout = 0.05 if exited_at is not None else min(0.1, max(0.0, deadline - now))
            for key, _ in sel.select(timeout=timeout):
                if key.fileobj is proc.stdin:
                    try:
                        written = os.write(proc.stdin.fileno(), pending[:65536])
                    except BlockingIOError:
                        continue
                    except OSError:  # the program closed its stdin
                        written = len(pending)
                    pending = pending[written:]
                    if not pending:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                if key.fileobj is channel_fd:
                    chan += chunk[: max(_MAX_CHANNEL_BYTES - len(chan), 0)]
                    continue
                buf = out[key.fileobj]
                room = limits.max_output_bytes - len(buf)
                if len(chunk) > room:
                    truncated = True
                buf += chunk[: max(room, 0)]
    finally:
        sel.close()
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()
    return bytes(out[stdout]), bytes(out[stderr]), bytes(chan), truncated, why


def _signal_of(returncode: int | None, plan: Plan) -> int | None:
    if returncode is None:
        return None
    if returncode < 0:
        return -returncode
    if plan.pid_namespace and 128 < returncode < 128 + 65:  # reported by a namespace init
        return returncode - 128
    return None


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _classify(returncode: int | None, stderr: str, why: str | None, plan: Plan) -> str:
    if why is not None:
        return why
    sig = _signal_of(returncode, plan)
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
    if "[Errno 28]" in last or "No space left" in last:
        return "disk"
    if returncode == 126 and not stderr:
        return "start_failed"
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

    shutil.rmtree(path, onerror=onerror)


def _execute(plan: Plan, source: str, limits: Limits, *, args: Sequence[str], stdin: bytes | None,
             channel: bool) -> SandboxResult:
    start = time.monotonic()
    identity = _identity(plan)
    interpreter = _interpreter_for(plan, identity)
    description = plan.description
    if interpreter is None:
        return SandboxResult(False, "start_failed", None, "", "no Python interpreter the sandbox user can run",
                             0.0, isolation=description)
    workdir = tempfile.mkdtemp(prefix=TEMP_PREFIX)
    read_fd = write_fd = None
    subreaper = False
    try:
        script = "main.py"
        with open(os.path.join(workdir, script), "w", encoding="utf-8") as fh:
            fh.write(source)
        os.chmod(workdir, 0o700)
        if identity is not None:
            for path in (workdir, os.path.join(workdir, script)):
                os.chown(path, identity.uid, identity.gid)
        extra_env: dict[str, str] = {}
        pass_fds: tuple[int, ...] = ()
        if channel:
            read_fd, write_fd = os.pipe()
            extra_env[RESULT_FD_ENV] = str(write_fd)
            pass_fds = (write_fd,)
        if plan.backend == "bwrap":
            env = _scrubbed_env(backends.BOX_WORK, extra_env)
            cmd = backends.bwrap_command(plan, interpreter, workdir, env, limits.max_disk_mb, script, args)
            cwd, watch = "/", None
        else:
            env = _scrubbed_env(workdir, extra_env)
            cmd = backends.plain_command(plan, interpreter, os.path.join(workdir, script), args)
            cwd, watch = workdir, workdir
        network_filter = seccomp.install() if plan.network_filter else None
        if plan.network_filter and network_filter is None:
            return SandboxResult(False, "start_failed", None, "", "the seccomp filter is not available",
                                 0.0, isolation=description)
        preexec = make_preexec(rlimits(limits, identity, plan.extra_procs), identity, network_filter)
        subreaper = identity is None and not plan.pid_namespace and _set_subreaper(True)
        before = set(_children(os.getpid()))
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                                    pass_fds=pass_fds, preexec_fn=preexec)
        except OSError as exc:
            return SandboxResult(False, "start_failed", None, "", f"could not start the sandbox: {exc}",
                                 time.monotonic() - start, isolation=description)
        if write_fd is not None:
            os.close(write_fd)
            write_fd = None
        try:
            out, err, chan, truncated, why = _collect(proc, start + limits.timeout_s, limits, stdin, read_fd, watch)
        finally:
            returncode = _kill_everything(proc, plan, identity, before)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        if read_fd is not None and why is None:  # what the harness wrote just before exiting
            chan += _drain(read_fd, _MAX_CHANNEL_BYTES - len(chan))
        stdout = out.decode("utf-8", errors="replace")
        stderr = err.decode("utf-8", errors="replace")
        status = _classify(returncode, stderr, why, plan)
        return SandboxResult(status == "ok", status, returncode, stdout, stderr, time.monotonic() - start,
                             truncated, description, chan if channel else None)
    finally:
        if subreaper:
            _set_subreaper(False)
        for fd in (read_fd, write_fd):
            if fd is not None:
                os.close(fd)
        _remove_tree(workdir)
        if identity is not None and plan.backend != "bwrap":
            users.remove_files_of(identity.uid)


def _drain(fd: int, room: int) -> bytes:
    data = bytearray()
    while room > 0:
        try:
            chunk = os.read(fd, min(65536, room))
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        data += chunk
        room -= len(chunk)
    return bytes(data)


def run_python(
    source: str,
    *,
    timeout_s: float = 10,
    memory_mb: int = 1024,
    cpu_s: float | None = None,
    max_file_mb: int = 16,
    max_disk_mb: int = 64,
    max_procs: int = 32,
    max_output_bytes: int = 1 << 20,
    args: Sequence[str] = (),
    stdin: bytes | None = None,
    channel: bool = False,
    backend: str | None = None,
) -> SandboxResult:
    """Run ``source`` as a Python script under limits; never raises for anything the program does.

    ``cpu_s`` defaults to ``timeout_s + 1``; ``max_procs`` is the number of processes the program may run;
    ``max_disk_mb`` caps its working directory; ``args`` become ``sys.argv[1:]``; ``stdin`` is fed to it.
    Output beyond ``max_output_bytes`` per stream is dropped (``truncated``). With ``channel=True`` the
    program finds a write-only pipe at the descriptor named by ``$STEPSCOPE_RESULT_FD``, returned as
    ``channel``. ``backend`` overrides ``$STEPSCOPE_SANDBOX`` (``auto``, ``bwrap``, ``unshare``,
    ``rlimit``). Limits are set through ``preexec_fn``, which Python warns is unsafe in heavily threaded
    programs: call this from a worker process (as :func:`~stepscope.evaluation.graders.grade_many` does).
    """
    limits = Limits(timeout_s, memory_mb, cpu_s, max_file_mb, max_disk_mb, max_procs, max_output_bytes)
    plan = _plan(backend)
    return _execute(plan, source, limits, args=args, stdin=stdin, channel=channel)

