"""A seccomp filter on every thread of the replica process (TSYNC), installed after the model loads.

    confine_process()   # once, after loading; every existing and future thread is bound

The request threads carry their own, stricter filter (`limits.install_seccomp`: no sockets, no
write-mode opens); this one binds the threads a request does not run on but could reach after
an escape (the event loop, Ray's core-worker and gRPC threads, the executor's pool), so that no
thread of the process can start a program. It refuses, with EPERM:

* starting programs: `execve`, `execveat`, `fork`, `vfork`, `clone` without `CLONE_THREAD`
  (`clone3` reports ENOSYS so libc falls back to `clone`);
* reaching other processes or the kernel's configuration: `ptrace`, `process_vm_readv/writev`,
  `kill`-family signals to other processes are left alone (Ray signals its own workers),
  `mount`, `umount2`, `pivot_root`, `chroot`, `unshare`, `setns`, module loading, `bpf`,
  `perf_event_open`, `userfaultfd`, `kexec_load`, `reboot`, `swapon`/`swapoff`, the key
  management calls.

What Ray and the runtime need after start-up, and therefore stays allowed process-wide (measured
by running the replica's request path and Ray's end-to-end tests under the filter): sockets
(`socket`, `connect`, `bind`, `accept`: gRPC to the raylet and GCS, the metrics agent, the
object store's Unix socket), opening files for writing (Ray's log files and the weight store's
cache when a model changes level), `memfd_create` and `mmap` (the object store). Paths cannot be
checked by seccomp (it sees pointers, not strings); the pod's read-only root filesystem and
the request threads' own filter cover writes.
"""

from __future__ import annotations

import ctypes
import struct

from model_runtime.sandbox.limits import (
    _AUDIT_ARCH_X86_64,
    _CLONE_THREAD,
    _ENOSYS,
    _EPERM,
    _JEQ_K,
    _JGE_K,
    _JSET_K,
    _LD_W_ABS,
    _NR_CLONE,
    _NR_CLONE3,
    _OFF_ARCH,
    _OFF_NR,
    _RET_ALLOW,
    _RET_ERRNO,
    _RET_K,
    _RET_KILL_PROCESS,
    _X32_BIT,
    _arg_low,
    _SockFprog,
    seccomp_supported,
)

# x86_64 syscall numbers of what no thread of a replica needs once the model is loaded.
PROCESS_DENIED = {
    "execve": 59, "execveat": 322, "fork": 57, "vfork": 58, "ptrace": 101, "process_vm_readv": 310,
    "process_vm_writev": 311, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "unshare": 272, "setns": 308, "init_module": 175, "finit_module": 313, "delete_module": 176,
    "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "kexec_load": 246, "kexec_file_load": 320,
    "reboot": 169, "swapon": 167, "swapoff": 168, "add_key": 248, "request_key": 249, "keyctl": 250,
}

_NR_SECCOMP = 317
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
_PR_SET_NO_NEW_PRIVS = 38


def process_program() -> list[tuple[int, int, int, int]]:
    prog: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),
        (_RET_K, 0, 0, _RET_KILL_PROCESS),
        (_LD_W_ABS, 0, 0, _OFF_NR),
        (_JGE_K, 0, 1, _X32_BIT),
        (_RET_K, 0, 0, _RET_ERRNO | _EPERM),
    ]
    for nr in PROCESS_DENIED.values():
        prog += [(_JEQ_K, 0, 1, nr), (_RET_K, 0, 0, _RET_ERRNO | _EPERM)]
    prog += [(_JEQ_K, 0, 1, _NR_CLONE3), (_RET_K, 0, 0, _RET_ERRNO | _ENOSYS)]
    prog += [
        (_JEQ_K, 0, 4, _NR_CLONE),
        (_LD_W_ABS, 0, 0, _arg_low(0)),
        (_JSET_K, 1, 0, _CLONE_THREAD),
        (_RET_K, 0, 0, _RET_ERRNO | _EPERM),
        (_RET_K, 0, 0, _RET_ALLOW),
    ]
    prog.append((_RET_K, 0, 0, _RET_ALLOW))
    return prog


_INSTALLED = False


def confine_process() -> bool:
    """Install the filter on every thread of this process (once). False where unsupported.

    Raises OSError if the kernel refuses (TSYNC fails when a thread already carries a filter
    that is not an ancestor of this one: call it before the request threads install theirs).
    """
    global _INSTALLED
    if _INSTALLED:
        return True
    if not seccomp_supported():
        return False
    prog = process_program()
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *insn) for insn in prog))
    fprog = _SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    rc = libc.syscall(_NR_SECCOMP, _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC, ctypes.byref(fprog))
    if rc != 0:
        detail = f"thread {rc} could not be synchronised" if rc > 0 else "seccomp(TSYNC) failed"
        raise OSError(ctypes.get_errno(), detail)
    _INSTALLED = True
    return True
