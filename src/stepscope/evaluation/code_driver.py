"""The trusted test driver that runs inside the sandbox (a standalone script: standard library only).

Why two processes: code and the test that judges it must not share an address space, or the code can fake
anything the test would report (exit early with status 0, register ``atexit``, patch the test's globals,
return an object whose ``==`` is always true). So the driver (H) forks the code runner (C) *before* it reads
the tests, and C drops everything H holds:

- H reads the candidate code (first frame on stdin), makes itself non-dumpable (so C, without capabilities,
  can neither ptrace it nor open its ``/proc`` entries), forks C, and only then reads the tests (second frame).
- C closes stdin and the result pipe, runs the candidate code, and answers H's requests with *data*: the
  value a function call returned, or what a program printed for a given input, encoded as tagged JSON.
- H runs the tests itself, with the candidate replaced by a proxy that sends the arguments to C and decodes
  the reply into plain built-in values (never an object C made). Expected values never leave H.
- H writes the verdict to the result pipe (``$STEPSCOPE_RESULT_FD``), which C never held. How any process
  exits, and anything printed, carries no verdict.

Wire format: each frame is a 4-byte big-endian length and a UTF-8 JSON document.
"""

import base64
import builtins
import ctypes
import io
import json
import os
import signal
import struct
import sys
import traceback

MAX_FRAME = 64 << 20
MAX_DEPTH = 200


# --- framing and the value codec --------------------------------------------------------------------


def read_exact(fd, n):
    data = bytearray()
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise EOFError("the other side closed the channel")
        data += chunk
    return bytes(data)


def read_frame(fd):
    (size,) = struct.unpack(">I", read_exact(fd, 4))
    if size > MAX_FRAME:
        raise ValueError("frame too large")
    return json.loads(read_exact(fd, size).decode("utf-8"))


def write_frame(fd, obj):
    data = json.dumps(obj, allow_nan=True).encode("utf-8")
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def encode(value, depth=0):
    """Plain data only; anything else (a custom class, a generator) is refused."""
    if depth > MAX_DEPTH:
        raise TypeError("value nested too deeply")
    kind = type(value)
    if kind.__module__ == "numpy" and hasattr(value, "tolist"):
        value = value.tolist()
        kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [encode(v, depth + 1) for v in value]
    if kind is tuple:
        return {"$tuple": [encode(v, depth + 1) for v in value]}
    if kind is dict:
        return {"$dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is set:
        return {"$set": [encode(v, depth + 1) for v in value]}
    if kind is frozenset:
        return {"$frozenset": [encode(v, depth + 1) for v in value]}
    if kind is bytes:
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if kind is complex:
        return {"$complex": [value.real, value.imag]}
    raise TypeError(f"cannot pass a value of type {kind.__name__} between the code and its test")


def decode(obj, depth=0):
    """The inverse of :func:`encode`, producing exact built-in types only."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    kind = type(obj)
    if obj is None or kind in (bool, int, float, str):
        return obj
    if kind is list:
        return [decode(v, depth + 1) for v in obj]
    if kind is dict and len(obj) == 1:
        (tag, body), = obj.items()
        if tag == "$tuple":
            return tuple(decode(v, depth + 1) for v in body)
        if tag == "$dict":
            return {decode(k, depth + 1): decode(v, depth + 1) for k, v in body}
        if tag == "$set":
            return {decode(v, depth + 1) for v in body}
        if tag == "$frozenset":
            return frozenset(decode(v, depth + 1) for v in body)
        if tag == "$bytes":
            return base64.b64decode(body.encode("ascii"))
        if tag == "$complex":
            return complex(float(body[0]), float(body[1]))
    raise ValueError("malformed value from the code under test")


# --- hardening --------------------------------------------------------------------------------------


def harden():
    """No new privileges, no capabilities, not dumpable (inherited by C across fork)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = (ctypes.c_uint32 * 6)()
        libc.capset(header, data)  # drop every capability (in a user namespace we may hold some)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
    except (OSError, AttributeError):
        pass


# --- C: the code runner -----------------------------------------------------------------------------


def run_code_server(code, mode, req_fd, rep_fd):
    """Runs in C: load the candidate, then answer requests until told to stop (never returns)."""
    try:
        program = compile(code, "solution.py", "exec")
        space = {"__name__": "solution", "__builtins__": builtins}
        if mode != "stdio":
            exec(program, space)
        write_frame(rep_fd, {"loaded": True})
    except BaseException as exc:  # noqa: BLE001 - report anything the code raised while loading
        write_frame(rep_fd, {"loaded": False, "error": describe(exc)})
        os._exit(0)
    while True:
        try:
            request = read_frame(req_fd)
        except (EOFError, ValueError, OSError):
            os._exit(0)
        if request.get("op") == "stdio":
            reply = run_stdio_case(program, request.get("input", ""), int(request.get("max_output", 1 << 20)))
        else:
            reply = call_function(space, request)
        try:
            write_frame(rep_fd, reply)
        except TypeError as exc:
            write_frame(rep_fd, {"error": ["TypeError", str(exc)]})


def call_function(space, request):
    try:
        name = request["name"]
        if request.get("method") and "Solution" in space:  # LeetCode style: a method of class Solution
            target = getattr(space["Solution"](), name)
        else:
            target = space[name]
        args = decode(request.get("args", []))
        return {"value": encode(target(*args))}
    except BaseException as exc:  # noqa: BLE001 - SystemExit too: it is the code's failure
        return {"error": [type(exc).__name__, str(exc)[:500]]}


def run_stdio_case(program, text, max_output):
    """Run the whole program once in a fresh fork with ``text`` as stdin; return what it printed."""
    read_out, write_out = os.pipe()
    path = "stepscope-case-input.txt"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    pid = os.fork()
    if pid == 0:
        os.close(read_out)
        fd = os.open(path, os.O_RDONLY)
        os.dup2(fd, 0)
        os.dup2(write_out, 1)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
        try:
            exec(program, {"__name__": "__main__", "__builtins__": builtins})
        except SystemExit:
            pass
        except BaseException:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            sys.stdout.flush()
            os._exit(1)
        sys.stdout.flush()
        os._exit(0)
    os.close(write_out)
    chunks, size = [], 0
    while True:
        chunk = os.read(read_out, 65536)
        if not chunk:
            break
        if size < max_output:
            chunks.append(chunk[: max_output - size])
        size += len(chunk)
    os.close(read_out)
    _, status = os.waitpid(pid, 0)
    return {"stdout": b"".join(chunks).decode("utf-8", "replace"), "exit": status}


def describe(exc):
    return f"{type(exc).__name__}: {str(exc)[:300]}"


# --- H: the judge -----------------------------------------------------------------------------------


class CodeFailed(Exception):
    """The candidate broke the protocol or died: a failure, not a test assertion."""


class Candidate:
    """What the test calls in place of the candidate function: a call across the process boundary."""

    def __init__(self, link, name, method=False):
        self._link, self._name, self._method = link, name, method
        self.__name__ = name

    def __call__(self, *args, **kwargs):
        if kwargs:
            raise TypeError("keyword arguments are not passed to the code under test")
        reply = self._link.ask({"op": "call", "name": self._name, "method": self._method, "args": encode(list(args))})
        if "error" in reply:
            kind, message = reply["error"]
            exc_type = getattr(builtins, kind, None)
            if isinstance(exc_type, type) and issubclass(exc_type, Exception) and exc_type is not CodeFailed:
                raise exc_type(message)
            raise RuntimeError(f"{kind}: {message}")
        try:
            return decode(reply["value"])
        except (KeyError, ValueError, TypeError) as exc:
            raise CodeFailed(f"bad reply from the code: {exc}") from None


class Link:
    def __init__(self, req_fd, rep_fd):
        self.req_fd, self.rep_fd = req_fd, rep_fd

    def ask(self, request):
        try:
            write_frame(self.req_fd, request)
            reply = read_frame(self.rep_fd)
        except (EOFError, OSError, ValueError) as exc:
            raise CodeFailed(f"the code under test stopped answering ({type(exc).__name__})") from None
        if not isinstance(reply, dict):
            raise CodeFailed("bad reply from the code")
        return reply


def judge_check(link, tests):
    """HumanEval style: the test's ``check(candidate)`` runs here, the candidate there."""
    space: dict[str, object] = {"__name__": "stepscope_test"}
    setup = tests.get("setup") or ""
    if setup:
        try:  # helper functions of the prompt that tests call (e.g. an encoder whose decoder is asked for)
            exec(compile(setup, "prompt.py", "exec"), space)
        except Exception:  # noqa: BLE001 - a prose prompt is not code; the test may not need it
            space = {"__name__": "stepscope_test"}
    entry = tests["entry_point"]
    candidate = Candidate(link, entry)
    space[entry] = candidate  # some tests call the function by name, not through check's argument
    exec(compile(tests["test"], "test.py", "exec"), space)
    check = space.get("check")
    if not callable(check):
        raise ValueError("the test code defines no check()")
    check(candidate)


def judge_cases(link, tests):
    """LiveCodeBench style: stdin/stdout cases, or calls of ``fn_name`` on decoded arguments."""
    for number, case in enumerate(tests["cases"]):
        if case.get("testtype") == "functional":
            name = tests.get("fn_name") or ""
            args = [json.loads(line) for line in case["input"].splitlines() if line.strip()]
            got = Candidate(link, name, method=True)(*args)
            if got != json.loads(case["output"]):
                raise AssertionError(f"test {number}: wrong result")
        else:
            reply = link.ask({"op": "stdio", "input": case["input"]})
            got = reply.get("stdout")
            if not isinstance(got, str):
                raise CodeFailed("bad reply from the code")
            if lines(got) != lines(case["output"]):
                raise AssertionError(f"test {number}: wrong output")


def lines(text):
    return [line.strip() for line in str(text).strip().splitlines()]


def main():
    result_fd = int(os.environ.pop("STEPSCOPE_RESULT_FD"))
    harden()
    first = read_frame(0)
    code, mode = first["code"], first["mode"]
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # C
        for fd in (result_fd, req_w, rep_r):
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        run_code_server(code, mode, req_r, rep_w)
        os._exit(0)
    os.close(req_r)
    os.close(rep_w)
    tests = read_frame(0)
    link = Link(req_w, rep_r)
    verdict = {"passed": False, "detail": ""}
    try:
        loaded = read_frame(rep_r)
        if not isinstance(loaded, dict) or not loaded.get("loaded"):
            error = loaded.get("error") if isinstance(loaded, dict) else "?"
            verdict["detail"] = f"the code failed to load: {error}"
        else:
            (judge_check if mode == "check" else judge_cases)(link, tests)
            verdict = {"passed": True, "detail": "all tests passed"}
    except EOFError:
        verdict["detail"] = "the code under test exited before the tests ran"
    except CodeFailed as exc:
        verdict["detail"] = str(exc)
    except AssertionError as exc:
        verdict["detail"] = "test failed" + (f": {exc}" if str(exc) else "") + at_line(exc)
    except MemoryError as exc:
        verdict["detail"] = "the code ran out of memory" + at_line(exc)
    except BaseException as exc:  # noqa: BLE001 - anything else the tests raised is a failure
        verdict["detail"] = describe(exc) + at_line(exc)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    write_frame(result_fd, verdict)
    os.close(result_fd)
    os._exit(0)


def at_line(exc):
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "test.py"]
    return f" (test line {frames[-1].lineno})" if frames else ""


if __name__ == "__main__":
    main()
