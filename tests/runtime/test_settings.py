"""The runtime's environment variables: one class reads them all, with the documented defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_runtime.settings import RuntimeSettings


def test_defaults_when_nothing_is_set() -> None:
    assert RuntimeSettings.from_env({}) == RuntimeSettings()


def test_each_variable_reaches_its_field() -> None:
    settings = RuntimeSettings.from_env({
        "NDIF_SANDBOX": "off", "NDIF_WEIGHT_STORE": "0", "NDIF_TORCH_THREADS": "3",
        "NDIF_WS_KEEPALIVE_SECONDS": "0.5", "NDIF_TP_COLLECTIVE_TIMEOUT_SECONDS": "30",
        "NDIF_TP_MASTER_ADDR": "10.0.0.2", "NDIF_MODEL_CACHE_DIR": "/data/cache",
        "NDIF_INFLUX_URL": "http://influx:8086", "NDIF_INFLUX_ORG": "o",
        "NDIF_INFLUX_BUCKET": "b", "NDIF_PROCESS_FILTER": "0", "NDIF_CREDENTIALS_DIR": "/etc/ndif/object-store",
        "NDIF_SANDBOX_TEST_WEDGE_HOOK": "1", "NDIF_DIRECT_CHANNEL": "0",
    })
    assert settings == RuntimeSettings(
        sandbox=False, weight_store=False, torch_threads=3, ws_keepalive_s=0.5, tp_collective_timeout_s=30.0,
        tp_master_addr="10.0.0.2", s3_cache=Path("/data/cache"), influx_url="http://influx:8086",
        influx_org="o", influx_bucket="b", process_filter=False,
        credentials_dir=Path("/etc/ndif/object-store"), sandbox_test_wedge_hook=True, direct_channel=False,
    )


@pytest.mark.parametrize(("value", "on"), [("1", True), ("true", True), ("ON", True), ("0", False), ("no", False),
                                           ("", True)])
def test_the_sandbox_flag(value: str, on: bool) -> None:
    assert RuntimeSettings.from_env({"NDIF_SANDBOX": value}).sandbox is on


def test_torch_threads_fall_back_to_omp() -> None:
    assert RuntimeSettings.from_env({"OMP_NUM_THREADS": "2"}).torch_threads == 2
    assert RuntimeSettings.from_env({"OMP_NUM_THREADS": "2", "NDIF_TORCH_THREADS": "1"}).torch_threads == 1


def test_no_other_runtime_module_reads_its_configuration_from_the_environment() -> None:
    root = Path(__file__).resolve().parents[2] / "model_runtime"
    readers = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        if path.name == "settings.py" or path.relative_to(root).as_posix() == "sandbox/global_settings.py":
            continue  # snapshots and restores os.environ as request-visible state; no settings
        if path.name == "credentials.py":
            continue  # takes credentials (not settings) out of the environment
        for needle in ("os.environ.get(", "os.getenv(", "os.environ["):
            if needle in text:
                readers.append(f"{path.relative_to(root)}: {needle}")
    # gateway/auth.py reads the variable its args name (GatewayAppArgs.api_key_hashes_env).
    assert readers == ["gateway/auth.py: os.environ.get("], readers


def test_no_credential_is_a_setting() -> None:
    """Tokens are credentials (model_runtime/credentials.py), read and held apart from the settings."""
    settings = RuntimeSettings.from_env({"NDIF_INFLUX_URL": "http://influx:8086", "NDIF_INFLUX_TOKEN": "t"})
    assert "t" not in vars(settings).values() and not any("token" in name for name in vars(settings))
