"""A live model replica on real Ray Serve is confined: every thread of its process (the request
thread that served a real request, Serve's event loop started before the filter, an asyncio pool
thread, a thread started after it) is refused exec, fork, write-opens and signals to other
processes, and the request thread carries its own filter on top; and the credentials it was
started with are gone from its environment and memory.

The probe is a test-only subclass of the production replica, defined here and deployed as its
own app: the production class has no such method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runtime.wire import capture_blob

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROBE_APP = "md-default-probe"
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAPROBEPROBEPROBE1",
    "AWS_SECRET_ACCESS_KEY": "probe-secret-value-7f3a9c",
    "HF_TOKEN": "hf_probe_token_51b0e2",
    "NDIF_INFLUX_TOKEN": "influx-probe-token-c41d",
    "SOME_SERVICE_PASSWORD": "probe-password-0b77",
}


def _probe_target(args: dict[str, Any]) -> Any:
    """The real ModelReplica plus a `probe` method (classes and helpers made here are pickled by
    value, so Ray's workers need nothing from tests/)."""
    from ray import serve
    from ray.serve.api import RunTarget

    from model_runtime.replica import app as model_app
    from ndif_operator.api.naming import MODEL_DEPLOYMENT

    def attempts(scratch: str) -> dict[str, str]:
        import errno
        import os
        import signal
        import socket
        import subprocess
        import threading

        out: dict[str, str] = {}

        def attempt(name: str, action: Any) -> None:
            try:
                action()
                out[name] = "ran"
            except OSError as exc:
                out[name] = errno.errorcode.get(exc.errno or 0, str(exc.errno))

        def fork() -> None:
            if os.fork() == 0:
                os._exit(0)

        def write_open() -> None:
            with open(os.path.join(scratch, f"written-by-{threading.get_ident()}"), "w") as handle:
                handle.write("escaped")

        attempt("exec", lambda: os.execv("/bin/true", ["true"]))
        attempt("subprocess", lambda: subprocess.run(["/bin/true"], check=False))
        attempt("fork", fork)
        attempt("write-open", write_open)
        attempt("signal another process", lambda: os.kill(os.getppid(), signal.SIGCONT))
        attempt("socket", lambda: socket.socket().close())  # Ray needs it; request threads do not
        with open("/proc/thread-self/status") as status:
            out["seccomp filters"] = status.read().split("Seccomp_filters:")[1].split()[0]
        return out

    class ConfinementProbe(model_app.ModelReplica.func_or_class):  # type: ignore[name-defined,misc]
        async def probe(self, scratch: str, secrets: list[str]) -> dict[str, Any]:
            import asyncio
            import os
            import threading

            from model_runtime import credentials
            from model_runtime.replica import execution

            report: dict[str, Any] = {"confined": self.confined}
            if not self.confined:  # never exec an unconfined replica away
                return report
            report["event loop thread"] = attempts(scratch)
            report["asyncio pool thread"] = await asyncio.to_thread(attempts, scratch)
            box: dict[str, str] = {}
            fresh = threading.Thread(target=lambda: box.update(attempts(scratch)))
            fresh.start()
            fresh.join()
            report["thread started after"] = box
            # The long-lived request thread that ran the real request before this probe.
            thread = execution._THREADS.acquire(self._runner, "nnsight-request")
            try:
                seen: dict[str, str] = {}
                thread.run(lambda: seen.update(attempts(scratch)), 30, 5, cancel=SystemExit)
            finally:
                execution._THREADS.release(self._runner, thread)
            report["request thread"] = seen
            with open("/proc/self/environ", "rb") as handle:
                environ = handle.read()
            report["secrets in os.environ"] = sorted(k for k, v in os.environ.items() if v in secrets)
            report["secrets in /proc/self/environ"] = [s for s in secrets if s.encode() in environ]
            report["credentials held"] = credentials._TAKEN is not None
            # InfluxDB is configured (NDIF_INFLUX_URL): the gateway writes the points, the replica
            # has no writer and no token.
            report["influx token"] = credentials.lookup(credentials.INFLUX_TOKEN)
            report["influx writer"] = [name for name in vars(self.metrics) if "influx" in name.lower()]
            return report

    deployment = serve.deployment(ConfinementProbe, name=MODEL_DEPLOYMENT).options(
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {**SECRETS, "NDIF_INFLUX_URL": "http://127.0.0.1:9"}}}
    )
    return RunTarget(target=deployment.bind(args), name=PROBE_APP, route_prefix=None)


@pytest.fixture(scope="module")
def probe_handle(served: dict[str, Any], tiny_llama: Path) -> Any:
    from ray import serve

    from runtime.conftest import model_args

    serve.run_many([_probe_target(model_args(tiny_llama, "default/probe"))])
    try:
        yield serve.get_app_handle(PROBE_APP)
    finally:
        serve.delete(PROBE_APP)


def test_every_thread_of_a_live_replica_is_confined(probe_handle: Any, client_model: Any, tmp_path: Path) -> None:
    key, blob = capture_blob(client_model, "The replica is confined")
    events = list(probe_handle.options(method_name="execute", stream=True).remote(
        "job-probe", {"model_key": key, "compress": True}, blob, 0))
    assert events[-1]["status"] == "COMPLETED", events[-1]  # a real request ran on the request thread

    tmp_path.chmod(0o777)
    report = probe_handle.probe.remote(str(tmp_path), list(SECRETS.values())).result()
    assert report["confined"] is True
    refused = {"exec": "EPERM", "subprocess": "EPERM", "fork": "EPERM", "write-open": "EPERM",
               "signal another process": "EPERM"}
    for where in ("event loop thread", "asyncio pool thread", "thread started after"):
        assert report[where] == {**refused, "socket": "ran", "seccomp filters": "1"}, (where, report[where])
    # The request thread carries the process filter and its own (no sockets either).
    assert report["request thread"] == {**refused, "socket": "EPERM", "seccomp filters": "2"}
    assert list(tmp_path.iterdir()) == []  # nothing was written

    # The credentials it was started with: read at start-up, used for loading, then gone.
    assert report["secrets in os.environ"] == []
    assert report["secrets in /proc/self/environ"] == []
    assert report["credentials held"] is False
    assert report["influx token"] is None and report["influx writer"] == []
    assert probe_handle.info.remote().result()["confined"] is True
