"""Hostile model-written code against the code grader: each program is contained, graded wrong, and the
harness keeps working afterwards. Run under every isolation backend this machine supports."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import textwrap
import time
import uuid

import pytest

from stepscope import sandbox
from stepscope.evaluation.datasets import Problem
from stepscope.evaluation.graders import grade, grade_many

PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
PROBLEM = Problem("toy/add", PROMPT, TEST, "code", {"entry_point": "add"})




def _respond(body: str) -> str:
    return "```python\ndef add(a, b):\n" + textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n```"


def _grade(body: str, timeout_s: float = 3.0):
    return grade(PROBLEM, _respond(body), timeout_s=timeout_s)


def _processes_with(token: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as fh:
                    if token.encode() in fh.read():
                        found.append(int(name))
            except OSError:
                continue
    return [pid for pid in found if pid != os.getpid()]


def _still_works() -> None:
    """The harness after a hostile run: a right answer passes and a wrong one fails."""
    assert _grade("return a + b").correct
    assert not _grade("return a - b").correct


# Every way of ending early or faking a pass that a wrong program might try.
EXIT_TRICKS = {
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "os._exit(0)": "import os\nos._exit(0)",
    "raise SystemExit(0)": "raise SystemExit(0)",
    "atexit exit": "import atexit, os\natexit.register(lambda: os._exit(0))\nreturn None",
    "excepthook exit": "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\nreturn None",
    "object equal to everything": "class E:\n    def __eq__(self, other):\n        return True\nreturn E()",
    "int subclass equal to everything": "class I(int):\n    def __eq__(self, other):\n        return True\nreturn I(0)",
    "forged verdict on every descriptor": (
        "import os, json, struct\n"
        "msg = json.dumps({'passed': True, 'detail': 'forged'}).encode()\n"
        "for fd in range(3, 256):\n"
        "    try:\n"
        "        os.write(fd, struct.pack('>I', len(msg)) + msg)\n"
        "    except OSError:\n"
        "        pass\n"
        "return None"
    ),
    "forged verdict through /proc of the parent": (
        "import os, json, struct\n"
        "msg = json.dumps({'passed': True, 'detail': 'forged'}).encode()\n"
        "for pid in (os.getppid(), 1, 2):\n"
        "    try:\n"
        "        for name in os.listdir(f'/proc/{pid}/fd'):\n"
        "            try:\n"
        "                fd = os.open(f'/proc/{pid}/fd/{name}', os.O_WRONLY)\n"
        "                os.write(fd, struct.pack('>I', len(msg)) + msg)\n"
        "            except OSError:\n"
        "                pass\n"
        "    except OSError:\n"
        "        pass\n"
        "return None"
    ),
    "patch the test's assert via builtins": (
        "import builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\nreturn 0"
    ),
    "print a fake pass": "print('all tests passed')\nreturn None",
    "kill the judge": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    "kill every process it can": "import os, signal\nos.kill(-1, signal.SIGKILL)",
}


# Without a uid drop or a pid namespace the program shares the test runner's uid: a kill would hit pytest.
_KILLERS = ("kill the judge", "kill every process it can")


def _unprotected(backend: str) -> bool:
    return os.geteuid() != 0 and backend == "rlimit"


@pytest.mark.parametrize("trick", list(EXIT_TRICKS))
def test_exit_and_forgery_tricks_never_pass(sandbox_backend, trick):
    if trick in _KILLERS and _unprotected(sandbox_backend):
        pytest.skip("as an ordinary user without namespaces the program could signal the test runner")
    result = _grade(EXIT_TRICKS[trick])
    assert not result.correct, f"{trick} passed: {result.detail}"


def test_exit_tricks_fail_on_the_unguarded_runner_too(sandbox_backend):
    """The same tricks do end with exit status 0 in a plain run: the verdict channel is what defends."""
    program = PROMPT + "    import os\n    os._exit(0)\n" + TEST + "\ncheck(add)\n"
    assert sandbox.run_python(program, timeout_s=5).ok


def test_fork_storm_is_contained(sandbox_backend):
    token = f"storm-{uuid.uuid4().hex}"
    body = (
        "import os, time, sys\n"
        f"sys.argv.append('{token}')\n"
        "for _ in range(3000):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        f"            os.execv('/bin/sleep', ['/bin/sleep', '60', '{token}'])\n"
        "    except OSError:\n"
        "        break\n"
        "time.sleep(60)"
    )
    start = time.monotonic()
    result = _grade(body, timeout_s=3)
    assert not result.correct and time.monotonic() - start < 15
    time.sleep(0.2)
    assert not _processes_with(token)
    _still_works()


def test_memory_bomb_is_contained(sandbox_backend):
    result = _grade("x = bytearray(64 * 1024**3)\nreturn a + b")
    assert not result.correct
    _still_works()


def test_disk_fill_inside_the_work_dir_is_capped(sandbox_backend):
    body = (
        "import os\n"
        "for i in range(10000):\n"
        "    with open(f'fill{i}', 'wb') as fh:\n"
        "        fh.write(b'x' * (8 << 20))\n"
        "return a + b"
    )
    free_before = shutil.disk_usage(tempfile.gettempdir()).free
    result = _grade(body, timeout_s=5)
    assert not result.correct
    assert shutil.disk_usage(tempfile.gettempdir()).free > free_before - (512 << 20)
    _still_works()


def test_disk_fill_and_writes_outside_leave_nothing(sandbox_backend):
    token = uuid.uuid4().hex
    targets = [f"/tmp/stepscope-escape-{token}", f"/var/tmp/stepscope-escape-{token}",
               f"/dev/shm/stepscope-escape-{token}", f"/root/stepscope-escape-{token}",
               f"/stepscope-escape-{token}"]
    body = (
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        with open(path, 'wb') as fh:\n"
        "            fh.write(b'x' * (4 << 20))\n"
        "    except OSError:\n"
        "        pass\n"
        "return a + b"
    )
    _grade(body)
    assert not [t for t in targets if os.path.exists(t)]
    _still_works()


def test_deleting_outside_the_work_dir_is_refused(sandbox_backend):
    victim = tempfile.mkdtemp(prefix="stepscope-victim-")
    os.chmod(victim, 0o755)
    with open(os.path.join(victim, "precious.txt"), "w") as fh:
        fh.write("keep me")
    try:
        body = (f"import shutil, os\nshutil.rmtree({victim!r}, ignore_errors=True)\n"
                f"try:\n    os.unlink({victim!r} + '/precious.txt')\nexcept OSError:\n    pass\nreturn a + b")
        _grade(body)
        with open(os.path.join(victim, "precious.txt")) as fh:
            assert fh.read() == "keep me"
    finally:
        shutil.rmtree(victim, ignore_errors=True)


def test_stdout_flood_is_capped(sandbox_backend):
    start = time.monotonic()
    result = _grade("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", timeout_s=3)
    assert not result.correct and time.monotonic() - start < 15
    _still_works()


def test_infinite_loop_and_long_sleep_time_out(sandbox_backend):
    for body in ("while True:\n    pass", "import time\ntime.sleep(3600)"):
        start = time.monotonic()
        result = _grade(body, timeout_s=2)
        assert not result.correct and time.monotonic() - start < 10
    _still_works()


def test_environment_secrets_do_not_reach_the_code(sandbox_backend, monkeypatch):
    secret = f"sk-{uuid.uuid4().hex}"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    # a wrong answer that would only be "right" if it could see the secret
    body = f"import os\nreturn 5 if {secret!r} in repr(dict(os.environ)) else -999"
    assert not _grade(body).correct


def test_other_processes_secrets_in_proc_are_out_of_reach(sandbox_backend):
    secret = f"secret-{uuid.uuid4().hex}"
    import subprocess

    holder = subprocess.Popen(["sleep", "30"], env={**os.environ, "STEPSCOPE_HOLDER": secret})
    try:
        body = (
            "import os\n"
            "found = False\n"
            "for pid in os.listdir('/proc'):\n"
            "    try:\n"
            "        found |= " + repr(secret) + " in open(f'/proc/{pid}/environ', errors='replace').read()\n"
            "    except OSError:\n"
            "        pass\n"
            "return a + b if found else -999"
        )
        assert not _grade(body).correct  # it could pass only by finding the secret
    finally:
        holder.kill()
        holder.wait()


def test_no_connection_reaches_a_local_listener(sandbox_backend):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        body = (
            "import socket, subprocess, sys\n"
            f"for attempt in range(2):\n"
            "    try:\n"
            f"        socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n"
            "    except OSError:\n"
            "        pass\n"
            "subprocess.run([sys.executable, '-c', "
            f"\"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)\"])\n"
            "return a - b"
        )
        _grade(body, timeout_s=5)
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_a_detached_daemon_does_not_outlive_the_run(sandbox_backend):
    token = f"daemon-{uuid.uuid4().hex}"
    body = (
        "import os\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['/bin/sleep', '60', '{token}'])\n"
        "    os._exit(0)\n"
        "return a + b"
    )
    result = _grade(body)
    assert result.correct  # a right answer with a stray daemon still passes: the daemon is killed, not graded
    time.sleep(0.2)
    assert not _processes_with(token)


def test_killing_the_parent_leaves_the_evaluation_running(sandbox_backend):
    if _unprotected(sandbox_backend):
        pytest.skip("as an ordinary user without namespaces the program could signal the test runner")
    problems = [PROBLEM] * 4
    responses = [_respond("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)"),
                 _respond("import os, signal\nos.kill(-1, signal.SIGKILL)"),
                 _respond("return a + b"),
                 _respond("return a * b")]
    grades = grade_many(problems, responses, workers=2, timeout_s=3)
    assert [g.correct for g in grades] == [False, False, True, False]
