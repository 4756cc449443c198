"""The replica process's seccomp filter (TSYNC): every thread, those started before it and after
it, cannot start a program, open a file for writing or change the file system, or signal another
process; sockets, reads and writes to descriptors opened before still work (what Ray needs).

Run in a child process: a seccomp filter is permanent for the process that installs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from model_runtime.sandbox import seccomp
from model_runtime.sandbox.process_filter import PROCESS

CHILD = textwrap.dedent(
    """
    import errno, json, os, signal, socket, subprocess, sys, threading
    from model_runtime.sandbox.process_filter import confine_process
    scratch = sys.argv[1]
    kept = open(os.path.join(scratch, "opened-before"), "w")  # like Ray's log files
    open(os.path.join(scratch, "existing"), "w").close()
    out = {}

    def attempt(name, action):
        try:
            action(); out[name] = "ran"
        except OSError as exc:
            out[name] = errno.errorcode[exc.errno]

    def write_open(path, mode):
        with open(path, mode):
            pass

    def escapes(where):
        attempt(f"exec ({where})", lambda: subprocess.run(["true"], check=False))
        attempt(f"execv ({where})", lambda: os.execv("/bin/true", ["true"]))
        attempt(f"create ({where})", lambda: write_open(os.path.join(scratch, where), "w"))
        attempt(f"write-open existing ({where})", lambda: write_open(os.path.join(scratch, "existing"), "r+"))
        attempt(f"append ({where})", lambda: write_open(os.path.join(scratch, "existing"), "a"))
        attempt(f"os.open O_RDWR ({where})", lambda: os.close(os.open(os.path.join(scratch, "existing"), os.O_RDWR)))
        moved = os.path.join(scratch, "moved")
        attempt(f"rename ({where})", lambda: os.rename(os.path.join(scratch, "existing"), moved))
        attempt(f"unlink ({where})", lambda: os.unlink(os.path.join(scratch, "existing")))
        attempt(f"mkdir ({where})", lambda: os.mkdir(os.path.join(scratch, "d")))
        attempt(f"signal parent ({where})", lambda: os.kill(os.getppid(), signal.SIGCONT))
        attempt(f"liveness check ({where})", lambda: os.kill(os.getppid(), 0))

    ready, go = threading.Event(), threading.Event()
    def started_before():
        ready.set(); go.wait(); escapes("older thread")
    older = threading.Thread(target=started_before); older.start(); ready.wait()
    out["installed"] = confine_process()
    go.set(); older.join()
    escapes("main thread")
    newer = threading.Thread(target=escapes, args=("newer thread",)); newer.start(); newer.join()
    def fork():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
    attempt("fork", fork)
    # What Ray needs: sockets, reads, writes to descriptors opened before, threads, signals to itself.
    server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1)
    client = socket.create_connection(server.getsockname()); client.close(); server.close()
    out["socket"] = "ok"
    out["read"] = len(open(__import__("json").__file__).read()) > 0
    kept.write("x"); kept.flush()
    out["write to an open descriptor"] = "ok"
    # A request thread adds its own, stricter filter on top (no sockets there).
    from model_runtime.sandbox.seccomp import install_request_filter
    def request_thread():
        install_request_filter()
        attempt("socket (request thread)", lambda: socket.socket().close())
        status = open("/proc/thread-self/status").read()
        out["filters (request thread)"] = status.split("Seccomp_filters:")[1].split()[0]
    stacked = threading.Thread(target=request_thread); stacked.start(); stacked.join()
    signal.signal(signal.SIGUSR1, lambda *a: out.__setitem__("signal to itself", "ok"))
    os.kill(os.getpid(), signal.SIGUSR1)
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not seccomp.supported(), reason="the filter is built for Linux x86_64")
def test_every_thread_is_confined_and_ray_needs_still_work(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    expected: dict[str, object] = {"installed": True, "fork": "EPERM", "socket": "ok", "read": True,
                                   "write to an open descriptor": "ok", "signal to itself": "ok",
                                   "socket (request thread)": "EPERM", "filters (request thread)": "2"}
    for where in ("older thread", "main thread", "newer thread"):
        for what in ("exec", "execv", "create", "write-open existing", "append", "os.open O_RDWR", "rename",
                     "unlink", "mkdir", "signal parent"):
            expected[f"{what} ({where})"] = "EPERM"
        expected[f"liveness check ({where})"] = "ran"
    assert out == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "opened-before"]
    assert (tmp_path / "opened-before").read_text() == "x"


def test_the_process_policy_is_well_formed_and_names_only_known_syscalls() -> None:
    prog = seccomp.build(PROCESS, own_pid=12345)
    for pc, (code, jt, jf, _k) in enumerate(prog):
        if code & 0x07 == 0x05:  # BPF_JMP: both targets inside the program
            assert pc + 1 + max(jt, jf) < len(prog)
    assert prog[-1] == (0x06, 0, 0, seccomp.RET_ALLOW)
    assert {"execve", "fork", "io_uring_setup", "ptrace", "creat", "rename"} <= PROCESS.deny
    assert not {"socket", "connect", "seccomp"} & PROCESS.deny  # Ray's network; request threads' own filter
    with pytest.raises(ValueError, match="own_pid"):
        seccomp.build(PROCESS)
    with pytest.raises(ValueError, match="unknown"):
        seccomp.Policy(deny=frozenset({"no_such_call"}))
