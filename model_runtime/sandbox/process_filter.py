"""The replica process's seccomp filter: every thread (TSYNC), installed once the model is loaded.

    confine_process()   # after loading; every existing and future thread of the process is bound

Request threads add their own, stricter filter on top (`seccomp.install_request_filter`: no
sockets either). This one binds the threads a request does not run on but could reach after an
escape (the event loop, Ray's core-worker and gRPC threads, Serve's threads, the executor's pool).
What it refuses, and why each class that stays allowed is needed, is measured by running the
Ray Serve end-to-end tests under it (docs/security.md, "The replica process's filter"):

* programs and processes: `execve`/`execveat`, `fork`/`vfork`, `clone` without `CLONE_THREAD`
  (`clone3` answers ENOSYS so libc falls back to `clone`);
* writing to the file system: `open`/`openat` with any of O_WRONLY, O_RDWR, O_CREAT, O_TRUNC,
  O_APPEND (`openat2` answers ENOSYS), `creat`, and every call that renames, removes, links,
  creates, truncates, or changes the mode, owner, times or attributes of a path. Nothing in Ray,
  Serve, torch or the runtime opens a file for writing once the model is loaded (descriptors
  opened before, Ray's and Serve's log files, stay writable);
* other processes and the kernel: `ptrace`, `process_vm_*`, `pidfd_*`, `kcmp`, mounts and
  namespaces, module loading, `bpf`, `perf_event_open`, `userfaultfd`, `io_uring` (its
  operations bypass seccomp), keys, clocks, `kexec`, `reboot`, swap, `personality`;
* signals to any process but this one (`kill`, `tgkill`, `rt_*sigqueueinfo` with another target
  and a signal other than 0; `tkill`, which names no process, and `pidfd_send_signal`).

Sockets stay (gRPC to the raylet and GCS, the object store's Unix socket, the metrics agent,
Serve's handles), as do reads, `mmap`, writes to descriptors already open, `kill(pid, 0)` (Ray's
core worker checks the raylet is alive every second) and `seccomp` itself (request threads add
their stricter filter on top; a filter can only be added, never removed). A tensor-parallel
replica's TCPStore runs without libuv (`parallel/group.tcp_store`): libuv's io_uring rings abort
the process at their next `io_uring_enter` once it is refused.
"""

from __future__ import annotations

import logging
import os
import threading

from model_runtime import credentials
from model_runtime.sandbox import seccomp
from model_runtime.settings import RuntimeSettings

log = logging.getLogger("ray.serve")

# NDIF_PROCESS_FILTER=0 (RuntimeSettings.process_filter) leaves the process unconfined: for a
# platform where seccomp is refused; never the default.

_PROCESS_DENIED = frozenset(
    {
        "execve", "execveat", "fork", "vfork",
        "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp", "pidfd_open",
        "pidfd_getfd", "pidfd_send_signal", "tkill",
        "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount", "fsopen",
        "fsconfig", "fsmount", "fspick", "mount_setattr", "init_module", "finit_module", "delete_module",
        "bpf", "perf_event_open", "userfaultfd", "kexec_load", "kexec_file_load", "reboot", "swapon",
        "swapoff", "add_key", "request_key", "keyctl", "acct", "syslog", "quotactl", "iopl", "ioperm",
        "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
        "vhangup", "uselib", "personality", "lookup_dcookie", "fanotify_init", "open_by_handle_at",
        "name_to_handle_at", "io_uring_setup", "io_uring_enter", "io_uring_register",
        "creat", "unlink", "unlinkat", "rename", "renameat", "renameat2", "mkdir", "mkdirat", "rmdir",
        "link", "linkat", "symlink", "symlinkat", "mknod", "mknodat", "chmod", "fchmod", "fchmodat",
        "fchmodat2", "chown", "fchown", "lchown", "fchownat", "truncate", "ftruncate", "utime", "utimes",
        "utimensat", "futimesat", "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr",
        "fremovexattr", "memfd_create",
    }
)
_SIGNALS_TO_SELF = frozenset({"kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"})

PROCESS = seccomp.Policy(deny=_PROCESS_DENIED | _SIGNALS_TO_SELF, write_opens=False,
                         signals_to_self_only=_SIGNALS_TO_SELF)

_LOCK = threading.Lock()
_INSTALLED_IN: int | None = None  # the pid that installed it (a filter is inherited, never removed)


def enabled() -> bool:
    return RuntimeSettings.from_env().process_filter


def confined() -> bool:
    return _INSTALLED_IN == os.getpid()


def confine_process() -> bool:
    """Install the filter on every thread of this process (once). False where unsupported.

    Raises OSError if the kernel refuses: TSYNC fails when a thread already carries a filter that is
    not an ancestor of this one, so call it before any request thread installs its own.
    """
    global _INSTALLED_IN
    with _LOCK:
        if confined():
            return True
        if not seccomp.supported():
            return False
        pid = os.getpid()
        seccomp.compile_policy(PROCESS, own_pid=pid).install(all_threads=True)
        _INSTALLED_IN = pid
        return True


def open_device(device: str) -> None:
    """Open what the device needs while files may still be opened read-write: the CUDA driver opens
    /dev/nvidia* O_RDWR when it creates the context, and cuBLAS loads on its first matmul."""
    if device != "cuda":
        return
    import torch

    x = torch.ones(8, 8, device="cuda")
    (x @ x).sum().item()


def confine_replica(what: str, device: str) -> bool:
    """A model replica or rank once its model is loaded: it forgets the credentials it loaded with
    (model_runtime/credentials.py), then `confine_process()`; logs the outcome.

    The filter is off only with NDIF_PROCESS_FILTER=0. A platform without seccomp (not Linux x86_64)
    runs unconfined, with a warning; a kernel that refuses the filter is an error.
    """
    credentials.forget()
    if not enabled():
        log.warning("%s: NDIF_PROCESS_FILTER=0, the process is not confined", what)
        return False
    open_device(device)
    if not confine_process():
        log.warning("%s: seccomp is not available on this platform; the process is not confined", what)
        return False
    log.info("%s: process confined (seccomp on every thread)", what)
    return True
