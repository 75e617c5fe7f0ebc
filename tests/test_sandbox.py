"""The sandbox contains what model-written code can do: forks, memory, files, hangs, network, floods."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

import pytest

from stepscope import sandbox
from stepscope.errors import StepscopeError


def _processes_with(token: str) -> list[int]:
    """Live processes whose command line holds ``token`` (zombies have an empty command line)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                if token.encode() in fh.read():
                    found.append(int(name))
        except OSError:
            continue
    return found


def _no_leftovers(token: str, grace_s: float = 1.0) -> bool:
    end = time.monotonic() + grace_s
    while _processes_with(token):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_normal_program_returns_its_output(sandbox_backend):
    result = sandbox.run_python("import sys\nprint('hello', sys.argv[1:])", args=["a", "b"], timeout_s=5)
    assert result.ok and result.status == "ok" and result.returncode == 0
    assert result.stdout == "hello ['a', 'b']\n"
    assert result.isolation == sandbox.isolation_mode() and result.isolation.startswith(sandbox_backend)


def test_exception_is_an_error_with_the_traceback(sandbox_backend):
    result = sandbox.run_python("raise ValueError('boom')", timeout_s=5)
    assert not result.ok and result.status == "error" and result.returncode == 1
    assert "ValueError: boom" in result.stderr


def test_environment_is_scrubbed_and_workdir_is_private_and_removed(sandbox_backend, monkeypatch):
    monkeypatch.setenv("STEPSCOPE_TEST_SECRET", "hunter2")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    program = "import os, json\nprint(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd()}))"
    result = sandbox.run_python(program, timeout_s=5)
    assert result.ok
    seen = json.loads(result.stdout)
    assert "STEPSCOPE_TEST_SECRET" not in seen["env"] and "HTTPS_PROXY" not in seen["env"]
    assert set(seen["env"]) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "OMP_NUM_THREADS",
                                "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "PWD"}  # sh sets PWD
    assert seen["env"]["HOME"] == seen["cwd"]
    if sandbox_backend == "bwrap":  # a private tmpfs, invisible from the host
        assert seen["cwd"] == "/sandbox/work"
    else:
        assert os.path.basename(seen["cwd"]).startswith(sandbox.TEMP_PREFIX)
        assert not os.path.exists(seen["cwd"])


def test_memory_bomb_is_stopped(sandbox_backend):
    start = time.monotonic()
    result = sandbox.run_python("block = bytearray(50 * 1024**3)\nprint('allocated')", timeout_s=10, memory_mb=512)
    assert not result.ok and result.status == "memory"
    assert "allocated" not in result.stdout
    assert time.monotonic() - start < 5


def test_huge_file_is_stopped_and_removed(sandbox_backend, tmp_path):
    program = (
        "import os\nprint(os.getcwd(), flush=True)\n"
        "with open('big.bin', 'wb') as fh:\n"
        "    for _ in range(4096):\n"
        "        fh.write(b'x' * 2**20)\n"
    )
    result = sandbox.run_python(program, timeout_s=10, max_file_mb=4)
    assert not result.ok and result.status == "file_size"
    assert not os.path.exists(result.stdout.strip())  # the work directory (and the file) are gone


def test_sleep_forever_times_out_promptly(sandbox_backend):
    start = time.monotonic()
    result = sandbox.run_python("import time\nprint('started', flush=True)\ntime.sleep(10**6)", timeout_s=1)
    elapsed = time.monotonic() - start
    assert not result.ok and result.status == "timeout"
    assert result.stdout == "started\n"  # output written before the kill is kept
    assert elapsed < 3.5


def test_cpu_time_limit(sandbox_backend):
    result = sandbox.run_python("while True:\n    pass", timeout_s=8, cpu_s=1)
    assert not result.ok and result.status in ("cpu", "killed")
    assert result.duration_s < 5


def test_fork_bomb_is_contained_and_leaves_nothing(sandbox_backend):
    token = f"forkbomb-{uuid.uuid4().hex}"
    # Bounded: 200 children that sleep, so nothing bad happens if containment failed.
    program = (
        "import os, sys, time\n"
        "children = []\n"
        "for _ in range(200):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    children.append(pid)\n"
        "for pid in children:\n"
        "    os.waitpid(pid, 0)\n"
    )
    start = time.monotonic()
    result = sandbox.run_python(program, timeout_s=2, args=[token])
    assert time.monotonic() - start < 6
    assert not result.ok and result.status in ("timeout", "error", "killed")
    assert _no_leftovers(token), f"sandbox children survived: {_processes_with(token)}"


def test_children_that_leave_the_process_group_still_die(sandbox_backend):
    token = f"escape-{uuid.uuid4().hex}"
    program = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print('parent done')\n"
    )
    result = sandbox.run_python(program, timeout_s=3, args=[token])
    assert result.stdout == "parent done\n"
    assert _no_leftovers(token), f"an escaped child survived: {_processes_with(token)}"


def test_network_is_unreachable(sandbox_backend):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        program = (
            "import socket\n"
            f"for host in [('127.0.0.1', {port}), ('1.1.1.1', 80)]:\n"
            "    try:\n"
            "        socket.create_connection(host, timeout=2).close()\n"
            "        print('CONNECTED', host)\n"
            "    except OSError as exc:\n"
            "        print('blocked', type(exc).__name__)\n"
        )
        result = sandbox.run_python(program, timeout_s=8)
        assert "CONNECTED" not in result.stdout
        assert result.stdout.count("blocked") == 2
    finally:
        server.close()


def test_socket_use_without_handling_is_not_ok(sandbox_backend):
    result = sandbox.run_python("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n", timeout_s=8)
    assert not result.ok and result.status == "error"


def test_output_flood_is_capped(sandbox_backend):
    program = "import sys\nfor _ in range(20000):\n    sys.stdout.write('x' * 1000)\nprint('end')"
    result = sandbox.run_python(program, timeout_s=10, max_output_bytes=10_000)
    assert result.ok and result.truncated
    assert len(result.stdout) == 10_000


def test_invalid_limits_are_a_user_error():
    with pytest.raises(StepscopeError, match="positive"):
        sandbox.run_python("print(1)", timeout_s=0)


def test_stdin_and_the_private_result_channel(sandbox_backend):
    program = (
        "import os, sys\n"
        "data = sys.stdin.buffer.read()\n"
        "os.write(int(os.environ['STEPSCOPE_RESULT_FD']), data[::-1])\n"
        "print(len(data))\n"
    )
    payload = os.urandom(300_000)  # larger than a pipe buffer: fed while the program reads
    result = sandbox.run_python(program, stdin=payload, channel=True, timeout_s=10)
    assert result.ok and result.stdout.strip() == str(len(payload))
    assert result.channel == payload[::-1]
    assert sandbox.run_python("print(1)", timeout_s=5).channel is None  # no channel unless asked


def _host_uids_of(token: str) -> set[int]:
    uids = set()
    for pid in _processes_with(token):
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as fh:
                uids |= {int(line.split()[1]) for line in fh if line.startswith("Uid:")}
        except OSError:
            continue
    return uids


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop applies to root callers")
def test_root_callers_run_the_program_as_a_fresh_unprivileged_uid(sandbox_backend):
    """Seen from the host (a user namespace may call the program root inside), the program is not root."""
    import threading

    seen: list[set[int]] = []
    for _ in range(2):
        token = f"uid-{uuid.uuid4().hex}"
        worker = threading.Thread(target=sandbox.run_python, args=("import time\ntime.sleep(1.5)",),
                                  kwargs={"timeout_s": 5, "args": [token]})
        worker.start()
        uids: set[int] = set()
        end = time.monotonic() + 1.2
        while time.monotonic() < end:
            uids |= _host_uids_of(token)
            time.sleep(0.05)
        worker.join()
        seen.append(uids - {0} if "uid" not in sandbox.isolation_mode() else uids)
    if "uid" in sandbox.isolation_mode():
        assert seen[0] and seen[1] and 0 not in seen[0] | seen[1]
        assert seen[0] != seen[1]  # one uid per run


def test_read_only_system_and_only_the_work_dir_writable(sandbox_backend):
    program = (
        "import os\n"
        "for path in ['/usr/stepscope-probe', '/etc/stepscope-probe', '/stepscope-probe']:\n"
        "    try:\n"
        "        open(path, 'w').close()\n"
        "        print('WROTE', path)\n"
        "        os.unlink(path)\n"
        "    except OSError as exc:\n"
        "        print('refused', exc.errno)\n"
        "open('mine.txt', 'w').write('ok')\n"
        "print(open('mine.txt').read())\n"
    )
    result = sandbox.run_python(program, timeout_s=5)
    assert result.ok and "WROTE" not in result.stdout and result.stdout.count("refused") == 3
    assert result.stdout.strip().endswith("ok")


def test_unknown_backend_is_a_user_error(monkeypatch):
    monkeypatch.setenv(sandbox.ENV_VAR, "chroot")
    with pytest.raises(StepscopeError, match="not a sandbox backend"):
        sandbox.run_python("print(1)")
