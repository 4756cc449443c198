"""Credentials a runtime process is given: read once at start-up, then kept out of its environment.

A model replica runs code from users who may find an escape; whatever sits in its environment
(`os.environ`, and the copy the kernel keeps in the process's memory and shows in
/proc/self/environ) is then one read away. So a replica, at start-up (`take()`):

* reads each credential from a file in `NDIF_CREDENTIALS_DIR` (a Secret mounted as a volume: one
  file per key, as Kubernetes writes it), else from the environment variable of that name;
* removes every credential-like variable from `os.environ` and overwrites it in the process's
  initial environment block, so that neither shows it any more;
* keeps only what loading a model needs (`LOADING`: the object store's keys for S3 sources, the
  Hub token), drops every other value at once, uses those only while loading (object-store or Hub
  reads) and forgets them after (`forget()`), before its process is confined.

A model replica therefore holds no credential while it serves requests: it never uploads results
and never writes metrics anywhere that needs a token (it reports its figures to the gateway in its
reply, model_runtime/metrics.py). The gateway reads the same way and keeps what it needs: the
results bucket's keys and the InfluxDB token.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

DIR_ENV = "NDIF_CREDENTIALS_DIR"  # RuntimeSettings.credentials_dir
# The credentials the runtime itself uses.
S3_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
HF_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
INFLUX_TOKEN = "NDIF_INFLUX_TOKEN"
KNOWN = (*S3_NAMES, *HF_NAMES, INFLUX_TOKEN)
# What a model replica keeps, until its model is loaded: object-store reads and Hub downloads.
LOADING = (*S3_NAMES, "AWS_REGION", "AWS_DEFAULT_REGION", *HF_NAMES)
# Any other variable whose name says it is a credential is removed too (and kept, unused).
_CREDENTIAL_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|API_KEY", re.I)


class Credentials:
    """What `take()` read. Values are never shown by repr or logged."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)

    def __repr__(self) -> str:
        return f"Credentials({sorted(self._values)})"

    def get(self, name: str) -> str | None:
        return self._values.get(name)

    def names(self) -> list[str]:
        return sorted(self._values)

    def s3(self) -> dict[str, str]:
        """boto3 client keywords; empty: boto3's own chain (the pod's identity, e.g. IRSA)."""
        keys = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
        found = {k: self._values[n] for k, n in zip(keys, S3_NAMES, strict=True) if self._values.get(n)}
        return found if "aws_access_key_id" in found and "aws_secret_access_key" in found else {}

    def region(self) -> str | None:
        """AWS_REGION / AWS_DEFAULT_REGION when given with the credentials (files); else boto3's own."""
        return self._values.get("AWS_REGION") or self._values.get("AWS_DEFAULT_REGION") or None

    def hf_token(self) -> str | None:
        return next((self._values[n] for n in HF_NAMES if self._values.get(n)), None)

    def clear(self) -> None:
        self._values.clear()


_LOCK = threading.Lock()
_TAKEN: Credentials | None = None
_KEEP: frozenset[str] | None = None  # the first `take(keep=...)`'s names: later reads keep no more


def is_credential_name(name: str) -> bool:
    # Digests are not credentials: the gateway's API-key hashes (NDIF_API_KEY_HASHES) stay where it reads them.
    return name in KNOWN or (bool(_CREDENTIAL_NAME.search(name)) and "HASH" not in name.upper())


def _read_dir(directory: Path) -> dict[str, str]:
    # Kubelet's atomic-writer layout: the keys are symlinks into `..data`; skip the dot entries.
    found = {}
    for path in directory.iterdir():
        if not path.name.startswith(".") and path.is_file():
            found[path.name] = path.read_text().strip()
    return found


def take(keep: Collection[str] | None = None) -> Credentials:
    """Read the credentials (once per process) and remove them from the environment.

    `keep`: the names to hold (a model replica passes `LOADING`); the others are scrubbed and
    dropped at once, in this read and every later one of the process (a reload after `forget()`).
    None keeps every one read (the gateway).
    """
    global _TAKEN, _KEEP
    with _LOCK:
        if _TAKEN is not None:
            return _TAKEN
        if keep is not None and _KEEP is None:
            _KEEP = frozenset(keep)
        values = {name: value for name, value in os.environ.items() if is_credential_name(name)}
        from model_runtime.settings import RuntimeSettings

        directory = RuntimeSettings.from_env().credentials_dir
        if directory is not None and directory.is_dir():
            values.update(_read_dir(directory))  # files win over variables
        scrub(list(values) + [name for name in KNOWN if name not in values])
        if _KEEP is not None:
            values = {name: value for name, value in values.items() if name in _KEEP}
        _TAKEN = Credentials(values)
        return _TAKEN


def current() -> Credentials:
    """The credentials `take()` read (taking them now if nothing did yet)."""
    return _TAKEN if _TAKEN is not None else take()


def lookup(name: str) -> str | None:
    """A credential by name: from what `take()` read in this process, else from the environment
    (a process that does not scrub, like the gateway)."""
    return _TAKEN.get(name) if _TAKEN is not None else os.environ.get(name)


@contextlib.contextmanager
def hub_token_in_environment() -> Iterator[None]:
    """The Hub token in the environment for the duration of one load (huggingface_hub reads it there)."""
    token = current().hf_token()
    if token is None:
        yield
        return
    os.environ["HF_TOKEN"] = token
    try:
        yield
    finally:
        os.environ.pop("HF_TOKEN", None)


def forget() -> None:
    """Drop every value (a replica, once its model is loaded). A later read finds none: the
    variables are gone, `NDIF_CREDENTIALS_DIR` with them (its name is credential-like)."""
    global _TAKEN
    with _LOCK:
        if _TAKEN is not None:
            _TAKEN.clear()
        _TAKEN = None


def scrub(names: list[str]) -> None:
    """Remove `names` from os.environ (and libc's environ) and overwrite them in the initial block."""
    for name in names:
        os.environ.pop(name, None)  # unsetenv too
    _wipe_initial_environment({name.encode() for name in names})


def _wipe_initial_environment(names: set[bytes]) -> None:
    """Overwrite `NAME=value` entries in the block the process started with (what the kernel shows
    in /proc/self/environ). After `unsetenv` nothing points at them any more; they are zeroed."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[-3]), int(fields[-2])  # env_start, env_end (exit_code is the last field)
    except (OSError, ValueError, IndexError):
        return  # no procfs: nothing shows the block
    if not 0 < start < end or end - start > 1 << 24:
        return
    block = ctypes.string_at(start, end - start)
    offset = 0
    for entry in block.split(b"\0"):
        name = entry.partition(b"=")[0]
        if name in names:
            ctypes.memset(start + offset, 0, len(entry))
        offset += len(entry) + 1
