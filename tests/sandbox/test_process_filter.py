"""The process-wide seccomp filter (TSYNC): every thread, also those started before it and
after it, cannot start a program; sockets and file writes (what Ray needs) still work.

Run in a child process: a seccomp filter is permanent for the process that installs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from model_runtime.sandbox.limits import seccomp_supported

CHILD = textwrap.dedent(
    """
    import errno, json, os, socket, subprocess, sys, threading
    from model_runtime.sandbox.process_filter import confine_process
    out = {}
    ready, go = threading.Event(), threading.Event()

    def started_before():
        ready.set(); go.wait()
        try:
            subprocess.run(["true"], check=False); out["exec from an older thread"] = "ran"
        except OSError as exc:
            out["exec from an older thread"] = errno.errorcode[exc.errno]

    older = threading.Thread(target=started_before); older.start(); ready.wait()
    out["installed"] = confine_process()
    go.set(); older.join()
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        out["fork"] = "ran"
    except OSError as exc:
        out["fork"] = errno.errorcode[exc.errno]

    def started_after():
        try:
            os.execv("/bin/true", ["true"]); out["exec from a newer thread"] = "ran"
        except OSError as exc:
            out["exec from a newer thread"] = errno.errorcode[exc.errno]

    newer = threading.Thread(target=started_after); newer.start(); newer.join()
    server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1)
    client = socket.create_connection(server.getsockname()); client.close(); server.close()
    out["socket"] = "ok"
    with open(sys.argv[1], "w") as handle:
        handle.write("x")
    out["file write"] = "ok"
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not seccomp_supported(), reason="the filter is built for Linux x86_64")
def test_every_thread_is_confined_and_ray_needs_still_work(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "written")],
        capture_output=True, text=True, timeout=120, cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {
        "installed": True, "exec from an older thread": "EPERM", "fork": "EPERM",
        "exec from a newer thread": "EPERM", "socket": "ok", "file write": "ok",
    }
