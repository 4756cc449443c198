"""Credentials are read once (files before variables), removed from `os.environ` and from the
block the kernel shows in /proc/self/environ, and forgotten after loading.

Each case runs in a child process: scrubbing changes the process's own environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from model_runtime import credentials

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from model_runtime import credentials
    keep = json.loads(os.environ.pop("KEEP", "null"))
    taken = credentials.take(keep=keep)
    with open("/proc/self/environ", "rb") as handle:
        block = handle.read()
    secret_values = sys.argv[1].split(",")
    report = {
        "names": taken.names(),
        "s3": taken.s3(),
        "hf": taken.hf_token(),
        "influx": credentials.lookup(credentials.INFLUX_TOKEN),
        "repr shows no value": not any(v in repr(taken) for v in secret_values),
        "in os.environ": sorted(k for k, v in os.environ.items() if v in secret_values),
        "in /proc/self/environ": [v for v in secret_values if v.encode() in block],
        "inherited by a child": subprocess.run(["env"], capture_output=True, text=True).stdout.count("value-"),
        "kept": os.environ.get("KEEP_ME"),
    }
    with credentials.hub_token_in_environment():
        report["hub token during a load"] = os.environ.get("HF_TOKEN")
    report["hub token after"] = os.environ.get("HF_TOKEN")
    credentials.forget()
    report["after forget"] = credentials.lookup("AWS_SECRET_ACCESS_KEY")
    report["read again"] = credentials.current().names()
    print(json.dumps(report))
    """
)


def _run(env: dict[str, str], keep: tuple[str, ...] | None = None) -> dict[str, object]:
    values = [v for k, v in env.items() if v.startswith("value-")]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, ",".join(values)], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "KEEP_ME": "plain", "KEEP": json.dumps(keep), **env},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_environment_credentials_are_taken_and_scrubbed() -> None:
    report = _run({
        "AWS_ACCESS_KEY_ID": "value-akid", "AWS_SECRET_ACCESS_KEY": "value-secret", "HF_TOKEN": "value-hf",
        "NDIF_INFLUX_TOKEN": "value-influx", "ANOTHER_SERVICE_PASSWORD": "value-pw",
    })
    assert report["names"] == ["ANOTHER_SERVICE_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN",
                               "NDIF_INFLUX_TOKEN"]
    assert report["s3"] == {"aws_access_key_id": "value-akid", "aws_secret_access_key": "value-secret"}
    assert report["hf"] == "value-hf" and report["influx"] == "value-influx"
    assert report["repr shows no value"] is True
    assert report["in os.environ"] == [] and report["in /proc/self/environ"] == []
    assert report["inherited by a child"] == 0
    assert report["kept"] == "plain"  # other variables stay
    assert report["hub token during a load"] == "value-hf" and report["hub token after"] is None
    assert report["after forget"] is None


def test_a_model_replica_keeps_only_what_loading_needs(tmp_path: Path) -> None:
    """A replica takes with `keep=LOADING`: the InfluxDB token and every other credential are
    scrubbed and dropped at once, and a later read (a reload after `forget()`) keeps no more."""
    mounted = tmp_path / "creds"
    mounted.mkdir()
    (mounted / "NDIF_INFLUX_TOKEN").write_text("value-influx-file")
    (mounted / "AWS_SECRET_ACCESS_KEY").write_text("value-secret")
    (mounted / "AWS_REGION").write_text("eu-west-1")
    report = _run({credentials.DIR_ENV: str(mounted), "AWS_ACCESS_KEY_ID": "value-akid",
                   "NDIF_INFLUX_TOKEN": "value-influx", "DB_PASSWORD": "value-pw"}, keep=credentials.LOADING)
    assert report["names"] == ["AWS_ACCESS_KEY_ID", "AWS_REGION", "AWS_SECRET_ACCESS_KEY"]
    assert report["influx"] is None
    assert report["in os.environ"] == [] and report["in /proc/self/environ"] == []
    # Once forgotten, nothing is read again (the directory's variable went with the credentials).
    assert report["read again"] == []


def test_files_in_the_credentials_directory_win(tmp_path: Path) -> None:
    mounted = tmp_path / "creds"
    (mounted / "..data").mkdir(parents=True)  # kubelet's layout: dot entries are skipped
    (mounted / "AWS_ACCESS_KEY_ID").write_text("file-akid\n")
    (mounted / "AWS_SECRET_ACCESS_KEY").write_text("file-secret")
    report = _run({credentials.DIR_ENV: str(mounted), "AWS_SECRET_ACCESS_KEY": "value-from-env"})
    assert report["s3"] == {"aws_access_key_id": "file-akid", "aws_secret_access_key": "file-secret"}
    assert report["in os.environ"] == [] and report["in /proc/self/environ"] == []


@pytest.mark.parametrize(("name", "secret"), [("AWS_SESSION_TOKEN", True), ("GITHUB_TOKEN", True),
                                              ("DB_PASSWORD", True), ("OMP_NUM_THREADS", False),
                                              ("NDIF_MODEL_CACHE_DIR", False), ("AWS_REGION", False),
                                              ("NDIF_API_KEY_HASHES", False)])
def test_credential_names(name: str, secret: bool) -> None:
    assert credentials.is_credential_name(name) is secret


LOAD_AND_FORGET = textwrap.dedent(
    """
    import gc, hashlib, json, os, sys
    from model_runtime import credentials
    from model_runtime.replica.loading import load_model
    from ndif_operator.api import ModelAppArgs
    digests = set(sys.argv[2].split(","))  # the values' sha256: the scan itself must not hold them

    def secret(item):
        return isinstance(item, str) and 16 <= len(item) <= 64 and hashlib.sha256(item.encode()).hexdigest() in digests

    credentials.take(keep=credentials.LOADING)  # what a model replica does at start
    args = ModelAppArgs(model_key="org/tiny", deployment="ns/tiny", repo_id="org/tiny", dtype="float32",
                        source={"s3": {"bucket": "weights", "prefix": "tiny", "endpoint_url": sys.argv[1]}})
    loaded = load_model(args)
    credentials.forget()  # what confine_replica does once the model is loaded
    gc.collect()
    from botocore.credentials import Credentials
    found = {"credential objects": sum(isinstance(o, Credentials) for o in gc.get_objects()), "holders": []}

    def holds(obj, depth=0):
        # Strings, and dicts or tuples of only strings, are not tracked by the collector: look into
        # what each tracked object refers to, and into untracked containers below it.
        for ref in gc.get_referents(obj):
            if secret(ref) or (depth < 3 and isinstance(ref, (dict, tuple, list, set, frozenset))
                               and not gc.is_tracked(ref) and holds(ref, depth + 1)):
                return True
        return False

    for obj in gc.get_objects():
        if holds(obj):
            found["holders"].append(type(obj).__name__)
    found["environ"] = sorted(k for k, v in os.environ.items() if secret(v))
    print(json.dumps(found))
    """
)


def test_after_an_s3_load_the_replica_holds_no_credential(tiny_llama: Path, s3_endpoint: str, tmp_path: Path) -> None:
    """A COLD load from S3 with keys from the replica's credentials directory: once the model is
    loaded and the credentials forgotten, no botocore credentials object and no dict, list or tuple
    holding a key's value is left in the process (a request that escaped could read it)."""
    import hashlib

    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="weights")
    for file in tiny_llama.iterdir():
        s3.upload_file(str(file), "weights", f"tiny/{file.name}")
    mounted = tmp_path / "weights-credentials"
    mounted.mkdir()
    secrets = {"AWS_ACCESS_KEY_ID": "AKIAWEIGHTSREADONLY1", "AWS_SECRET_ACCESS_KEY": "weights-secret-5d1e0c",
               "AWS_REGION": "us-east-1"}
    for name, value in secrets.items():
        (mounted / name).write_text(value)
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_FORGET, s3_endpoint,
         ",".join(hashlib.sha256(v.encode()).hexdigest() for v in list(secrets.values())[:2])],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", credentials.DIR_ENV: str(mounted),
             "NDIF_MODEL_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"credential objects": 0, "holders": [], "environ": []}
