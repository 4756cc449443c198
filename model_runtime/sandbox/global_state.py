"""Process-wide and per-thread state a request could change, snapshotted and put back.

    with state_restored(changed):   # on the thread that runs the request
        ...                         # `changed` gets the names of what the request had changed

A request runs on a long-lived thread of a long-lived process: any torch or interpreter
setting it changes (grad or inference mode, autocast, deterministic algorithms, default dtype or
device, matmul precision, `torch.backends` flags, RNG, warnings filters, thread count, anomaly
mode, torch-function and dispatch mode stacks, ...) would otherwise stay set for the next
user. `SETTINGS` (model_runtime/sandbox/global_settings.py) lists each as a getter and a setter with
the torch setter names it covers.

Thread-local settings are restored on the request's thread, process-wide ones too (from the
same thread). A change made between two requests (for example by a finaliser of an object a
request left behind, run at garbage collection) is caught by comparing, at the start of each
request, with the state the previous one on this thread was restored to.

Both reads start with a native change record (`native/state_reads.cpp`) of the settings whose
getters cost most in place: where it equals the record read with the previous values, those
settings keep them and their getters are not called. The RNGs are copied as bytes (the default CPU
generator's whole state, the `random` module's words) and set back only where they moved.
"""

from __future__ import annotations

import contextlib
import logging
import random
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from model_runtime.sandbox.global_settings import _AUTOCAST_DEVICES, SETTINGS, Setting

_log = logging.getLogger(__name__)
_C: Any = torch._C



def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    try:
        return bool(a == b)
    except Exception:  # values that refuse comparison are compared by identity
        return a is b


def _native_reads() -> Any:
    """`native/state_reads.cpp` (the change records below), or None where it is not built or
    does not load (then every getter is called on every read, as the records would only spare)."""
    try:
        from model_runtime.sandbox.native.build import STATE_BUILD_DIR, STATE_NAME
        from model_runtime.sandbox.native.loading import load_built

        return load_built(STATE_BUILD_DIR, STATE_NAME)
    except Exception as exc:  # missing build, ABI mismatch
        _log.info("global state read by its getters only: %s: %s", type(exc).__name__, exc)
        return None


_NATIVE = _native_reads()


def _settings_record(settings: list[Setting]) -> tuple[Callable[[], bytes] | None, frozenset[str]]:
    """The native record of the plain settings it covers, and their names: (None, empty) unless
    it loads, names only settings this module has, and reads the same record twice."""
    if _NATIVE is None:
        return None, frozenset()
    names = {s.name for s in settings}
    devices = [d for d in _AUTOCAST_DEVICES if f"autocast[{d}]" in names and f"autocast_dtype[{d}]" in names]
    covered = frozenset([*_NATIVE.names(), *(f"autocast{kind}[{d}]" for d in devices for kind in ("", "_dtype"))])
    try:
        _NATIVE.configure(devices)
        stable = _NATIVE.settings() == _NATIVE.settings()
    except Exception as exc:
        _log.info("global state read by its getters only: %s: %s", type(exc).__name__, exc)
        return None, frozenset()
    if not covered <= names or not stable:
        _log.info("global state read by its getters only: the native record covers %s",
                  sorted(covered - names) or "an unstable reading")
        return None, frozenset()
    return _NATIVE.settings, covered


# The settings compared between requests (all but the RNG states): those the native record covers
# last, each list in `SETTINGS`' order (the per-backend precisions stay before the legacy one).
_PLAIN = [s for s in SETTINGS if not s.rng]
_RECORD, _COVERED = _settings_record(_PLAIN)
_REST_GETTERS = [s.get for s in _PLAIN if s.name not in _COVERED]
_COVERED_GETTERS = [s.get for s in _PLAIN if s.name in _COVERED]
_PLAIN_SETTINGS = [s for s in _PLAIN if s.name not in _COVERED] + [s for s in _PLAIN if s.name in _COVERED]
_N_REST = len(_REST_GETTERS)


def _read(last: GlobalState | None) -> tuple[list[Any], bytes | None]:
    """The plain settings' values now, and the native record they were read with (None without
    one). Where the record equals `last`'s, the settings it covers hold what they held then:
    their values are `last`'s, and their getters are not called."""
    record = _RECORD() if _RECORD is not None else None
    rest = [get() for get in _REST_GETTERS]
    if record is not None and last is not None and record == last.record:
        return rest + last.plain[_N_REST:], record
    return rest + [get() for get in _COVERED_GETTERS], record


def _unchanged(current: list[Any], recorded: list[Any]) -> bool:
    """True when every value equals the recorded one, compared at C speed (list equality: the
    identity, then `==`, of each item). Values that refuse a plain truth value (tensors, arrays)
    or raise answer False: the caller then compares setting by setting (`_same`)."""
    try:
        return bool(current == recorded)
    except Exception:
        return False


class _Generator(NamedTuple):
    """A random generator's state: `read()` a snapshot; `put_back(snapshot)` restores it (where the
    snapshot is a cheap record, only if the generator moved away from it)."""

    read: Callable[[], Any]
    put_back: Callable[[Any], object]


def _cpu_generator(setting: Setting) -> _Generator:
    """The default CPU generator by its native record (the engine's words, counters and seed, and
    both cached normal samples: what `get_rng_state` serialises), else by torch's getter and setter."""
    if _NATIVE is not None:
        try:
            record = _NATIVE.cpu_rng()
            state = torch.random.get_rng_state()
            _NATIVE.set_cpu_rng(record)
            if torch.equal(torch.random.get_rng_state(), state) and _NATIVE.cpu_rng() == record:
                read, put = _NATIVE.cpu_rng, _NATIVE.set_cpu_rng
                return _Generator(read, lambda snapshot: read() != snapshot and put(snapshot))
        except Exception as exc:
            _log.info("the CPU generator read by torch's getter: %s: %s", type(exc).__name__, exc)
    return _Generator(setting.get, setting.set)


_RANDOM: Any = random.getstate.__self__  # type: ignore[attr-defined]  # the instance behind the `random` module's functions


def _python_words() -> tuple[bytes, Any]:
    return _NATIVE.python_rng(_RANDOM), _RANDOM.gauss_next


def _python_state(snapshot: tuple[bytes, Any]) -> tuple[Any, ...]:
    words, gauss_next = snapshot
    index, *state = struct.unpack("=i624I", words)
    return (_RANDOM.VERSION, (*state, index), gauss_next)


def _put_back_python_words(snapshot: tuple[bytes, Any]) -> None:
    if _python_words() != snapshot:
        _RANDOM.setstate(_python_state(snapshot))


def _python_generator(setting: Setting) -> _Generator:
    """The `random` module's generator by a copy of its words (CPython's layout, checked here
    against `getstate()`), set through `setstate` only when they differ; else by its getter and
    setter."""
    if _NATIVE is not None and type(_RANDOM) is random.Random:
        try:
            if _python_state(_python_words()) == _RANDOM.getstate():
                return _Generator(_python_words, _put_back_python_words)
        except Exception as exc:
            _log.info("the Python generator read by getstate: %s: %s", type(exc).__name__, exc)
    return _Generator(setting.get, setting.set)


def _generator(setting: Setting) -> _Generator:
    if setting.name == "torch_rng":
        return _cpu_generator(setting)
    if setting.name == "python_rng":
        return _python_generator(setting)
    return _Generator(setting.get, setting.set)


_RNG_SETTINGS = [s for s in SETTINGS if s.rng]
_GENERATORS = [_generator(s) for s in _RNG_SETTINGS]


class GlobalState:
    """The values of every setting: `plain` in `_PLAIN_SETTINGS`' order (`record`: the native record
    read with them), `rng` one snapshot per `_GENERATORS`."""

    __slots__ = ("plain", "record", "rng")

    def __init__(self, plain: list[Any], record: bytes | None = None, rng: list[Any] | None = None) -> None:
        self.plain = plain
        self.record = record
        self.rng = rng if rng is not None else [generator.read() for generator in _GENERATORS]

    @classmethod
    def capture(cls) -> GlobalState:
        return cls(*_read(None))

    def restore(self, *, rng: bool = True, current: list[Any] | None = None) -> list[str]:
        """Put every setting back; return the names of those that had changed. `current`: the
        plain settings' values already read now (saves reading them again)."""
        if rng:
            for generator, snapshot in zip(_GENERATORS, self.rng, strict=True):
                generator.put_back(snapshot)
        try:
            now = current if current is not None else _read(self)[0]
        except Exception:  # a getter that raises in the state the request left: one by one below
            now = None
        if now is not None and _unchanged(now, self.plain):
            return []
        changed: list[str] = []
        for setting, value in zip(_PLAIN_SETTINGS, self.plain, strict=True):
            try:
                same = _same(setting.get(), value)
            except Exception:  # a getter that raises in the state the request left: set it
                same = False
            if not same:
                changed.append(setting.name)
                try:
                    setting.set(value)
                except Exception as exc:  # must not stop the rest from being restored
                    _log.error("could not restore %s: %s", setting.name, exc)
        return changed


_LAST = threading.local()


@contextlib.contextmanager
def state_restored(changed: list[str] | None = None) -> Iterator[None]:
    """Restore every setting after the block; first undo anything changed since the previous
    request on this thread was restored."""
    report = changed if changed is not None else []
    last: GlobalState | None = getattr(_LAST, "state", None)
    state: GlobalState | None = None
    if last is not None:
        # One read of every setting serves both as the between-requests check and, when nothing
        # changed (the usual case), as this request's capture: the values are the ones the
        # previous request was restored to.
        try:
            now, record = _read(last)
        except Exception:
            now, record = None, None
        between = last.restore(rng=False, current=now)
        if between:
            _log.warning("global state changed between requests, restored: %s", ", ".join(between))
            report.extend(f"{name} (between requests)" for name in between)
        elif now is not None:
            state = GlobalState(now, record)  # (the RNG states are read here)
    if state is None:
        state = GlobalState.capture()
    try:
        yield
    finally:
        report.extend(state.restore())
        _LAST.state = state
