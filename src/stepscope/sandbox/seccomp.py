"""A seccomp filter that takes network sockets away from a process, for machines without network namespaces.

The filter is a short classic-BPF program installed with ``prctl(PR_SET_SECCOMP)`` between fork and exec. It
refuses ``socket()`` (every address family: an AF_UNIX socket can reach host services through abstract names)
and ``io_uring_setup`` (io_uring can create sockets without the ``socket`` system call) with ``EACCES``; a
system call made through another ABI (x32, 32-bit compat) kills the process, so the filter cannot be stepped
around by switching ABI. ``socketpair`` stays allowed: its two ends reach nothing outside the process tree.
Needs ``PR_SET_NO_NEW_PRIVS`` first (no privilege is needed for either call).
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

__all__ = ["install", "network_filter", "supported"]

# BPF instruction classes and fields (linux/filter.h, linux/bpf_common.h)
_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x05 | 0x30 | 0x00  # BPF_JMP | BPF_JGE | BPF_K
_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K

_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_RET_KILL_PROCESS = 0x80000000

# offsets in struct seccomp_data: int nr; u32 arch; ...
_OFF_NR = 0
_OFF_ARCH = 4

_X32_SYSCALL_BIT = 0x40000000

# Per architecture: the audit arch value and the system call numbers to refuse (socket, io_uring_setup).
_ARCHES: dict[str, tuple[int, tuple[int, ...]]] = {
    "x86_64": (0xC000003E, (41, 425)),
    "aarch64": (0xC00000B7, (198, 425)),
}

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def supported() -> bool:
    """Whether this machine's architecture has a filter here (Linux x86-64 and arm64)."""
    return platform.system() == "Linux" and platform.machine() in _ARCHES


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def network_filter(machine: str | None = None) -> bytes:
    """The BPF program (packed ``sock_filter`` array) for ``machine`` (default: this one)."""
    machine = machine or platform.machine()
    arch, refused = _ARCHES[machine]
    deny = _RET_ERRNO | errno.EACCES
    body = [
        _insn(_LD_W_ABS, 0, 0, _OFF_ARCH),
        _insn(_JEQ_K, 1, 0, arch),  # native ABI: go on; otherwise fall through to the kill
        _insn(_RET_K, 0, 0, _RET_KILL_PROCESS),
        _insn(_LD_W_ABS, 0, 0, _OFF_NR),
    ]
    if machine == "x86_64":  # x32 calls share the arch value and carry this bit
        body += [_insn(_JGE_K, 0, 1, _X32_SYSCALL_BIT), _insn(_RET_K, 0, 0, _RET_KILL_PROCESS)]
    for number in refused:
        body += [_insn(_JEQ_K, 0, 1, number), _insn(_RET_K, 0, 0, deny)]
    body.append(_insn(_RET_K, 0, 0, _RET_ALLOW))
    return b"".join(body)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Prepared:
    """A filter laid out in memory before fork, so the child only makes two ``prctl`` calls."""

    def __init__(self, program: bytes) -> None:
        self._buffer = ctypes.create_string_buffer(program, len(program))
        self._fprog = _SockFprog(len(program) // 8, ctypes.cast(self._buffer, ctypes.c_void_p))
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl
        self._prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]

    def apply(self) -> bool:
        """Install in the calling process (irreversible); True when the kernel accepted it."""
        if self._prctl(_PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
            return False
        return self._prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(self._fprog), 0, 0) == 0


def install() -> Prepared | None:
    """A prepared network filter for this machine, or None where none is supported."""
    if not supported():
        return None
    try:
        return Prepared(network_filter())
    except (OSError, AttributeError):
        return None
