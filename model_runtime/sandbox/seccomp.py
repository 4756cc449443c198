"""The one builder of seccomp filters (Linux x86_64): a `Policy` in, classic BPF out, installed
on one thread or on every thread of the process.

Two policies use it: the request threads' filter (`request_filter`, installed by each request
thread at its first request) and the replica process's filter (`model_runtime.sandbox.
process_filter`, installed on every thread once the model is loaded). Filters stack: a request
thread started after the process filter carries both, and the stricter answer wins.

seccomp sees syscall numbers and argument *values*, never the memory they point at: it can refuse
`openat` with a write flag, not `openat` of one path. Calls whose flags live in a struct it cannot
read (`clone3`, `openat2`) answer ENOSYS, so that libc falls back to the call it can check.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import struct
import sys
from dataclasses import dataclass, field

Instruction = tuple[int, int, int, int]  # (code, jt, jf, k) of `struct sock_filter`

# Syscall numbers (x86_64).
SYSCALLS: dict[str, int] = {
    # starting programs and processes
    "execve": 59, "execveat": 322, "fork": 57, "vfork": 58,
    # other processes and the kernel
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "process_madvise": 440,
    "kcmp": 312, "pidfd_open": 434, "pidfd_getfd": 438, "pidfd_send_signal": 424,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442, "init_module": 175, "finit_module": 313, "delete_module": 176, "bpf": 321,
    "perf_event_open": 298, "userfaultfd": 323, "kexec_load": 246, "kexec_file_load": 320, "reboot": 169,
    "swapon": 167, "swapoff": 168, "add_key": 248, "request_key": 249, "keyctl": 250, "acct": 163,
    "syslog": 103, "quotactl": 179, "iopl": 172, "ioperm": 173, "settimeofday": 164, "clock_settime": 227,
    "clock_adjtime": 305, "adjtimex": 159, "sethostname": 170, "setdomainname": 171, "vhangup": 153,
    "uselib": 134, "personality": 135, "lookup_dcookie": 212, "fanotify_init": 300,
    "open_by_handle_at": 304, "name_to_handle_at": 303, "seccomp": 317,
    # io_uring runs opens, connects and writes that seccomp never sees
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    # signals (refused outright, or allowed only to this process: see Policy.signals_to_self_only)
    "kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
    # the network
    "socket": 41, "socketpair": 53, "connect": 42, "bind": 49, "listen": 50, "accept": 43, "accept4": 288,
    # changing the file system (names, modes, sizes) without opening for writing
    "creat": 85, "unlink": 87, "unlinkat": 263, "rename": 82, "renameat": 264, "renameat2": 316,
    "mkdir": 83, "mkdirat": 258, "rmdir": 84, "link": 86, "linkat": 265, "symlink": 88, "symlinkat": 266,
    "mknod": 133, "mknodat": 259, "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452,
    "chown": 92, "fchown": 93, "lchown": 94, "fchownat": 260, "truncate": 76, "ftruncate": 77,
    "utime": 132, "utimes": 235, "utimensat": 280, "futimesat": 261,
    "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197, "lremovexattr": 198,
    "fremovexattr": 199,
    "memfd_create": 319,
}
# Which argument of each signal call is the signal number.
_SIGNAL_ARG = {"kill": 1, "tgkill": 2, "rt_sigqueueinfo": 1, "rt_tgsigqueueinfo": 2}
_NR_CLONE, _NR_CLONE3, _NR_OPEN, _NR_OPENAT, _NR_OPENAT2 = 56, 435, 2, 257, 437
_NR_SECCOMP = 317
# Flags that make an open able to change a file: O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_APPEND (and
# O_TMPFILE, which contains O_DIRECTORY|__O_TMPFILE and needs a write mode anyway).
O_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_CLONE_THREAD = 0x00010000
EPERM, ENOSYS = 1, 38

# BPF (linux/filter.h, linux/seccomp.h).
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_RET_KILL_PROCESS = 0x80000000
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_BIT = 0x40000000
_OFF_NR, _OFF_ARCH = 0, 4
_MAX_INSNS = 4096  # BPF_MAXINSNS


def _arg_low(i: int) -> int:
    return 16 + 8 * i  # seccomp_data.args[i], its low 32 bits (little-endian)


@dataclass(frozen=True)
class Policy:
    """What a filter refuses. Everything not named is allowed."""

    deny: frozenset[str]  # names of SYSCALLS, refused with EPERM
    new_processes: bool = False  # allow clone without CLONE_THREAD (fork by another name)
    write_opens: bool = True  # allow open/openat with a flag of O_WRITE_FLAGS
    # Allow these signal calls only when their target process (kill's pid, tgkill's tgid) is this
    # one: a confined process may signal its own threads, never the raylet or another worker.
    signals_to_self_only: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        unknown = (self.deny | self.signals_to_self_only) - SYSCALLS.keys()
        if unknown:
            raise ValueError(f"unknown syscalls {sorted(unknown)}")
        if not self.signals_to_self_only <= _SIGNAL_ARG.keys():
            raise ValueError(f"only {sorted(_SIGNAL_ARG)} can be limited to this process")


def _errno(code: int) -> Instruction:
    return (_RET_K, 0, 0, _RET_ERRNO | code)


def build(policy: Policy, own_pid: int | None = None) -> list[Instruction]:
    """The filter as `sock_filter` tuples. `own_pid` is needed with `signals_to_self_only`."""
    prog: list[Instruction] = [
        (_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),
        (_RET_K, 0, 0, _RET_KILL_PROCESS),  # another ABI (i386 via int 0x80): no numbers to check
        (_LD_W_ABS, 0, 0, _OFF_NR),
        (_JGE_K, 0, 1, _X32_BIT),  # the x32 ABI aliases every syscall: refuse it outright
        _errno(EPERM),
    ]
    for name in sorted(policy.deny - policy.signals_to_self_only, key=SYSCALLS.__getitem__):
        prog += [(_JEQ_K, 0, 1, SYSCALLS[name]), _errno(EPERM)]
    if policy.signals_to_self_only:
        if own_pid is None:
            raise ValueError("signals_to_self_only needs own_pid")
        for name in sorted(policy.signals_to_self_only, key=SYSCALLS.__getitem__):
            # The target process is the first argument; signal 0 sends nothing (a liveness check:
            # Ray's core worker asks `kill(raylet, 0)` every second), so it may go anywhere.
            prog += [
                (_JEQ_K, 0, 6, SYSCALLS[name]),
                (_LD_W_ABS, 0, 0, _arg_low(0)),
                (_JEQ_K, 3, 0, own_pid),
                (_LD_W_ABS, 0, 0, _arg_low(_SIGNAL_ARG[name])),
                (_JEQ_K, 1, 0, 0),
                _errno(EPERM),
                (_RET_K, 0, 0, RET_ALLOW),
            ]
    if not policy.new_processes:
        prog += [(_JEQ_K, 0, 1, _NR_CLONE3), _errno(ENOSYS)]
        prog += [
            (_JEQ_K, 0, 4, _NR_CLONE),
            (_LD_W_ABS, 0, 0, _arg_low(0)),
            (_JSET_K, 1, 0, _CLONE_THREAD),  # a thread is fine, a new process is not
            _errno(EPERM),
            (_RET_K, 0, 0, RET_ALLOW),
        ]
    if not policy.write_opens:
        prog += [(_JEQ_K, 0, 1, _NR_OPENAT2), _errno(ENOSYS)]  # its flags are behind a pointer
        for nr, flags_arg in ((_NR_OPEN, 1), (_NR_OPENAT, 2)):
            prog += [
                (_JEQ_K, 0, 4, nr),
                (_LD_W_ABS, 0, 0, _arg_low(flags_arg)),
                (_JSET_K, 0, 1, O_WRITE_FLAGS),
                _errno(EPERM),
                (_RET_K, 0, 0, RET_ALLOW),
            ]
    prog.append((_RET_K, 0, 0, RET_ALLOW))
    if len(prog) > _MAX_INSNS:
        raise ValueError(f"filter of {len(prog)} instructions exceeds BPF_MAXINSNS")
    return prog


def supported() -> bool:
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Compiled:
    """A filter ready to install (its buffer kept alive as long as the object)."""

    def __init__(self, prog: list[Instruction]) -> None:
        self.length = len(prog)
        self._buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *insn) for insn in prog))
        self._fprog = _SockFprog(len(prog), ctypes.cast(self._buf, ctypes.c_void_p))

    def install(self, *, all_threads: bool) -> None:
        """Install on the calling thread, or with TSYNC on every thread of the process. Permanent.

        Raises OSError. TSYNC fails when a thread already carries a filter that is not an
        ancestor of the calling thread's: install the process filter before any thread adds its own.
        """
        if not supported():
            raise OSError("seccomp filters are built for Linux x86_64 only")
        libc = _libc()
        pr_set_no_new_privs, seccomp_set_mode_filter, filter_flag_tsync = 38, 1, 1
        if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        flags = filter_flag_tsync if all_threads else 0
        rc = libc.syscall(_NR_SECCOMP, seccomp_set_mode_filter, flags, ctypes.byref(self._fprog))
        if rc != 0:
            # With TSYNC a positive answer is the id of a thread that could not be synchronised.
            raise OSError(ctypes.get_errno(), f"thread {rc} could not take the filter" if rc > 0 else "seccomp failed")


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def compile_policy(policy: Policy, own_pid: int | None = None) -> Compiled:
    return Compiled(build(policy, own_pid))


# --------------------------------------------------------------------------------------------
# The request threads' filter: no programs, no network, no writes to the file system, no
# signals, no other process. Read-only opens stay (imports and lazily loaded kernels need them).

REQUEST_THREAD = Policy(
    deny=frozenset(
        {
            "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev",
            "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
            "creat", "unlink", "unlinkat", "rename", "renameat", "renameat2", "mkdir", "mkdirat", "rmdir",
            "chmod", "fchmod", "fchmodat", "truncate", "link", "linkat", "symlink", "symlinkat",
            "mount", "kill", "tkill", "memfd_create", "seccomp", "chroot", "init_module", "finit_module",
            "bpf", "unshare", "setns",
        }
    ),
    write_opens=False,
)


def request_policy(write_opens: bool = False) -> Policy:
    return REQUEST_THREAD if not write_opens else Policy(REQUEST_THREAD.deny, write_opens=True)


@functools.cache
def _request_filter(write_opens: bool) -> Compiled:
    # Built once per process: installing is then a prctl and a syscall per request thread.
    return compile_policy(request_policy(write_opens))


def install_request_filter() -> None:
    """Install the request threads' filter on the calling thread. Raises OSError.

    Once CUDA is initialised, write-mode opens are left to the process filter: the driver may open
    its device files read-write from the first thread that touches the GPU (untested on a GPU here).
    """
    torch = sys.modules.get("torch")
    cuda = bool(torch is not None and torch.cuda.is_initialized())
    _request_filter(write_opens=cuda).install(all_threads=False)
