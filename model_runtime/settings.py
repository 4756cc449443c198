"""The runtime's environment variables, read in one place.

The gateway and the model replicas take every knob from their process environment through
`RuntimeSettings.from_env()`; no other runtime module reads `os.environ` for configuration. Each
field names its variable and default, so docs/runtime.md's table and this class cannot drift far.
The settings are read when asked for (not at import), so a test's `monkeypatch.setenv` applies.

The only environment variable not here is the API key digests' one: its *name* is an argument of
the gateway application (`GatewayAppArgs.api_key_hashes_env`), so `gateway.auth` reads it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_TRUE = ("1", "true", "on", "yes")


def _flag(value: str | None, default: bool) -> bool:
    if value is None or not value.strip():
        return default
    return value.strip().lower() in _TRUE


@dataclass(frozen=True)
class RuntimeSettings:
    # NDIF_SANDBOX: run requests in the sandbox (on unless 0/false/off/no).
    sandbox: bool = True
    # NDIF_WEIGHT_STORE: share weights through the node's weight store ("0" turns it off; every
    # replica then keeps its own host copy).
    weight_store: bool = True
    # NDIF_TORCH_THREADS (else OMP_NUM_THREADS): torch's intra-op threads; 0 leaves torch's default.
    torch_threads: int = 0
    # NDIF_WS_KEEPALIVE_SECONDS: how often the gateway repeats a running job's status on its socket.
    ws_keepalive_s: float = 20.0
    # NDIF_TP_COLLECTIVE_TIMEOUT_SECONDS: a tensor-parallel collective waits this long for a dead rank.
    tp_collective_timeout_s: float = 120.0
    # NDIF_TP_MASTER_ADDR: where a tensor-parallel replica's ranks meet (all on one node: loopback).
    tp_master_addr: str = "127.0.0.1"
    # NDIF_MODEL_CACHE_DIR: where checkpoints from S3 are staged on the node.
    s3_cache: Path = Path("/tmp/ndif-model-cache")
    # NDIF_INFLUX_URL / _ORG / _BUCKET: optional InfluxDB points, written by the gateway; no URL, no
    # points. Its token is a credential, not a setting (model_runtime/credentials.py).
    influx_url: str = ""
    influx_org: str = ""
    influx_bucket: str = "ndif"
    # NDIF_PROCESS_FILTER: a model replica confines its process once loaded ("0" turns it off).
    process_filter: bool = True
    # NDIF_CREDENTIALS_DIR: a mounted Secret, one file per credential (model_runtime/credentials.py).
    credentials_dir: Path | None = None
    # NDIF_DIRECT_CHANNEL: the gateway sends a request straight to its model's replica over a TCP
    # channel when the app has one RUNNING replica (model_runtime/gateway/channel.py); "0" sends
    # every request through Serve's handle.
    direct_channel: bool = True
    # NDIF_SANDBOX_TEST_WEDGE_HOOK: tests only: request code may import the sandbox's wedge hook (one
    # C call no stop reaches), to prove a wedged replica is replaced. Nothing the operator renders sets it.
    sandbox_test_wedge_hook: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RuntimeSettings:
        env = os.environ if environ is None else environ
        default = cls()
        threads = env.get("NDIF_TORCH_THREADS") or env.get("OMP_NUM_THREADS") or "0"
        return cls(
            sandbox=_flag(env.get("NDIF_SANDBOX"), default.sandbox),
            weight_store=env.get("NDIF_WEIGHT_STORE", "1").strip() != "0",
            torch_threads=int(threads),
            ws_keepalive_s=float(env.get("NDIF_WS_KEEPALIVE_SECONDS", default.ws_keepalive_s)),
            tp_collective_timeout_s=float(
                env.get("NDIF_TP_COLLECTIVE_TIMEOUT_SECONDS", default.tp_collective_timeout_s)
            ),
            tp_master_addr=env.get("NDIF_TP_MASTER_ADDR", default.tp_master_addr),
            s3_cache=Path(env.get("NDIF_MODEL_CACHE_DIR", str(default.s3_cache))),
            influx_url=env.get("NDIF_INFLUX_URL", ""),
            influx_org=env.get("NDIF_INFLUX_ORG", ""),
            influx_bucket=env.get("NDIF_INFLUX_BUCKET", default.influx_bucket),
            process_filter=env.get("NDIF_PROCESS_FILTER", "1").strip() != "0",
            credentials_dir=Path(env["NDIF_CREDENTIALS_DIR"]) if env.get("NDIF_CREDENTIALS_DIR") else None,
            direct_channel=_flag(env.get("NDIF_DIRECT_CHANNEL"), default.direct_channel),
            sandbox_test_wedge_hook=_flag(env.get("NDIF_SANDBOX_TEST_WEDGE_HOOK"), default.sandbox_test_wedge_hook),
        )
