"""A local Ray head for embedded mode, started as a subprocess and stopped without orphans.

`ray start --head --block` runs in a new session (its own process group). On SIGTERM it tears its
own children down; whatever survives (workers that did not notice their raylet died) is found by
our private `--temp-dir` in its command line and killed. We never run `ray stop`: it kills every
Ray process of the user on the machine, including clusters that other programs started.

The operator package must not import `ray`, so everything here goes through the `ray` CLI that
sits next to the running interpreter and through the dashboard's HTTP API.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ndif_operator.api.naming import GATEWAY_DIRECT_PORT

# Environment every Ray process (and so every Serve replica) inherits. Token auth is on by default in
# Ray 2.60; a loopback-only cluster runs without it.
_RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # Ray maps 127.0.0.1 to the machine's routable address unless it believes it is a one-machine
    # cluster (its macOS default); this keeps the GCS, raylet and client server on loopback too.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Draining on SIGTERM exists for proxies on other nodes; alone on one machine it only delays exit.
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
}
LOOPBACK = "127.0.0.1"
HEAD_MARKER_ENV = "NDIF_LOCAL_RAY_HEAD"


class RayHeadError(RuntimeError):
    """The local Ray head could not be started (the message says why and where the logs are)."""


@dataclass(frozen=True)
class RayPorts:
    """Every fixed port a head binds; explicit so that two local clusters never collide."""

    gcs: int = 6390
    dashboard: int = 8265
    serve_http: int = 8000
    gateway_direct: int = GATEWAY_DIRECT_PORT  # the gateway replica's own listener: what clients use
    client_server: int = 10001
    dashboard_agent_listen: int = 52365

    # Ray refuses fixed ports inside its worker range (10002-19999): the dashboard (8265 + delta)
    # must stay below it, and the client server (10001 - delta) must not climb into it.
    MAX_OFFSET = 1700

    @classmethod
    def offset(cls, delta: int) -> RayPorts:
        """The default ports shifted by `delta` (tests and benchmarks use their own block)."""
        if not 0 <= delta <= cls.MAX_OFFSET:
            raise ValueError(f"port offset must be within 0..{cls.MAX_OFFSET} (Ray keeps 10002-19999), got {delta}")
        base = cls()
        return cls(
            gcs=base.gcs + delta,
            dashboard=base.dashboard + delta,
            serve_http=base.serve_http + delta,
            gateway_direct=base.gateway_direct + delta,
            # Downwards: Ray's worker ports take 10002-19999 by default.
            client_server=base.client_server - delta,
            dashboard_agent_listen=base.dashboard_agent_listen + delta,
        )


@dataclass(frozen=True)
class RayHeadSpec:
    """What to start: resources, ports, where its files go and what its workers can import."""

    num_cpus: int
    num_gpus: int = 0
    ports: RayPorts = field(default_factory=RayPorts)
    temp_dir: Path | None = None  # default: /tmp/ndif-local-<gcs port>; short, Ray's socket paths are capped
    pythonpath: tuple[str, ...] = ()
    object_store_bytes: int = 512 * 1024**2
    env: Mapping[str, str] = field(default_factory=dict)
    # Custom resources and node labels (`--resources`, `--labels`): the GPU pinning declarations
    # (ndif_operator.api.pinning) of the pod this head stands for.
    resources: Mapping[str, float] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def resolved_temp_dir(self) -> Path:
        return self.temp_dir or Path(f"/tmp/ndif-local-{self.ports.gcs}")

    @property
    def dashboard_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.dashboard}"

    @property
    def serve_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.serve_http}"


def ray_cli() -> str:
    """The `ray` executable of the running interpreter's environment (works without activating it)."""
    beside = Path(sys.executable).parent / "ray"
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise RayHeadError("the `ray` command is not installed (pip install 'ray[serve]')")
    return found


def start_command(spec: RayHeadSpec, ray: str = "ray") -> list[str]:
    """The `ray start` command line for `spec` (pure, so tests can check every flag)."""
    ports = spec.ports
    return [
        ray, "start", "--head", "--block", "--disable-usage-stats",
        f"--node-ip-address={LOOPBACK}",
        f"--port={ports.gcs}",
        "--include-dashboard=true",
        f"--dashboard-host={LOOPBACK}",
        f"--dashboard-port={ports.dashboard}",
        f"--dashboard-agent-listen-port={ports.dashboard_agent_listen}",
        f"--ray-client-server-port={ports.client_server}",
        f"--num-cpus={spec.num_cpus}",
        f"--num-gpus={spec.num_gpus}",
        f"--object-store-memory={spec.object_store_bytes}",
        f"--temp-dir={spec.resolved_temp_dir}",
        *([f"--resources={json.dumps(dict(sorted(spec.resources.items())), separators=(',', ':'))}"]
          if spec.resources else []),
        *([f"--labels={','.join(f'{k}={v}' for k, v in sorted(spec.labels.items()))}"] if spec.labels else []),
    ]  # fmt: skip


def start_env(spec: RayHeadSpec, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of the head: `base`, our fixed settings, and PYTHONPATH for the replicas."""
    env = dict(base)
    # A RAY_ADDRESS from the caller's shell names some other cluster; ours must not join it.
    env.pop("RAY_ADDRESS", None)
    env.update(_RAY_ENV)
    env.update(spec.env)
    # Inherited by every process of this head, workers included, whose command lines Ray rewrites
    # (setproctitle): how `processes_of` finds stragglers.
    env[HEAD_MARKER_ENV] = str(spec.resolved_temp_dir)
    paths = [*spec.pythonpath, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def busy_ports(ports: RayPorts) -> list[int]:
    fixed = (ports.gcs, ports.dashboard, ports.serve_http, ports.gateway_direct, ports.client_server)
    return [p for p in fixed if not _port_free(p)]


class LocalRayHead:
    """Start/stop one Ray head. Use as a context manager; `stop()` is idempotent."""

    def __init__(self, spec: RayHeadSpec, *, log: Callable[[str], None] = print) -> None:
        self.spec = spec
        self._log = log
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout_path = spec.resolved_temp_dir / "ray-start.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, *, timeout: float = 120.0) -> None:
        self._clear_stale()
        busy = busy_ports(self.spec.ports)
        if busy:
            raise RayHeadError(
                f"ports {busy} on {LOOPBACK} are in use (another Ray or server?); pick others with --port-offset"
            )
        temp = self.spec.resolved_temp_dir
        temp.mkdir(parents=True, exist_ok=True)
        self._owner_file.write_text(f"{os.getpid()}\n")
        self._log(f"starting Ray head (dashboard {self.spec.dashboard_url}, files in {temp}) ...")
        with open(self._stdout_path, "wb") as out:
            self._proc = subprocess.Popen(
                start_command(self.spec, ray_cli()),
                env=start_env(self.spec, os.environ),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: Ctrl-C in our terminal reaches only us
                preexec_fn=_terminate_with_parent,
            )
        try:
            self._wait_dashboard(timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def _owner_file(self) -> Path:
        return self.spec.resolved_temp_dir / "owner.pid"

    def _clear_stale(self) -> None:
        """Kill what an earlier run on this port block left behind when it died without cleaning up
        (SIGKILL, a crash); refuse if that run is still alive."""
        stale = processes_of(self.spec.resolved_temp_dir)
        if not stale:
            return
        owner = read_owner(self._owner_file)
        if owner is not None and owner != os.getpid() and pid_alive(owner):
            raise RayHeadError(
                f"another local mode (pid {owner}) runs on this port block ({self.spec.resolved_temp_dir}); "
                "stop it, or pick other ports with --port-offset"
            )
        self._log(f"cleaning up {len(stale)} process(es) left by an earlier run that did not stop cleanly")
        _kill_all(stale)

    def _wait_dashboard(self, timeout: float) -> None:
        # Serve's REST API lives in the dashboard head; once it answers, deploys can go in.
        url = f"{self.spec.dashboard_url}/api/serve/applications/"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RayHeadError(f"`ray start` exited with {self._proc.returncode}; see {self._stdout_path}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RayHeadError(f"the Ray dashboard did not answer within {timeout:.0f}s; see {self._stdout_path}")

    def stop(self, *, grace: float = 30.0) -> None:
        """SIGTERM the head's process group, wait, then SIGKILL whatever of ours is left.

        Does nothing unless this object started a head: the processes of the port block might
        belong to another live run (`start` refused because of it).
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self._log("stopping Ray head ...")
            # The leader alone: its handler stops its children in order (a group-wide TERM races it).
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        _signal_group(proc.pid, signal.SIGKILL)  # stragglers in the group (e.g. the reaper)
        leftovers = processes_of(self.spec.resolved_temp_dir)
        deadline = time.monotonic() + 10
        while leftovers and time.monotonic() < deadline:
            # Workers exit on their own once the raylet is gone; give them a moment, then insist.
            time.sleep(0.5)
            leftovers = processes_of(self.spec.resolved_temp_dir)
        _kill_all(leftovers)
        self._owner_file.unlink(missing_ok=True)

    def __enter__(self) -> LocalRayHead:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM it when we die, even by SIGKILL (Linux PR_SET_PDEATHSIG),
    so `ray start` tears its cluster down instead of living on as an orphan. The kernel ties this to
    the *thread* that started it: call `LocalRayHead.start` from a thread that outlives the head."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the next run's stale-process cleanup still covers a hard kill


def read_owner(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _kill_all(pids: Sequence[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)  # SIGKILL is asynchronous; ports are free only once they are gone


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def processes_of(temp_dir: Path, proc_root: Path = Path("/proc")) -> list[int]:
    """Pids of the head started with `temp_dir`: marked in their environment or naming it in argv."""
    marker = f"{HEAD_MARKER_ENV}={temp_dir}".encode()
    needle = str(temp_dir).encode()
    me = os.getpid()
    found: list[int] = []
    for entry in proc_root.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0") or _names_dir(cmdline, needle):
            found.append(int(entry.name))
    return sorted(found)


def _names_dir(cmdline: bytes, needle: bytes) -> bool:
    # Match the directory itself or a path under it, not a sibling such as /tmp/ndif-local-63900.
    for arg in cmdline.split(b"\0"):
        index = arg.find(needle)
        while index != -1:
            end = index + len(needle)
            if end == len(arg) or arg[end : end + 1] in (b"/", b" ", b",", b'"', b"'"):
                return True
            index = arg.find(needle, index + 1)
    return False
