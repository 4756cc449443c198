"""The native change records of the global state (native/state_reads.cpp): the settings record
changes whenever a covered setting changes, by whatever path; a request that changes a covered
setting or draws from a generator is still caught and put back; without an agreeing record, every
getter is called as before."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from model_runtime.sandbox import global_state
from model_runtime.sandbox.global_state import SETTINGS, Setting, state_restored


def _on_thread(run: Callable[[], None]) -> None:
    """As a request: on a fresh thread (the thread-local settings are its own)."""
    errors: list[BaseException] = []

    def body() -> None:
        try:
            run()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    if errors:
        raise errors[0]


def _record() -> bytes:
    assert global_state._RECORD is not None, "python -m model_runtime.sandbox.native.build"
    return global_state._RECORD()


def _covered() -> list[Setting]:
    return [s for s in SETTINGS if s.name in global_state._COVERED]


def _flipped(setting: Setting, value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, tuple):  # cuBLAS reduced precision: (allow, allow split-K)
        return (not value[0], value[1]) if value[0] else (True, True)
    if isinstance(value, torch.dtype):
        return torch.bfloat16 if value != torch.bfloat16 else torch.float16
    if setting.name == "set_qengine":
        return next(e for e in torch._C._supported_qengines() if e != value)
    if setting.name == "set_sdp_priority_order":
        return list(reversed(value))
    if setting.name == "set_sm_carveout_experimental":
        return 3 if value is None else None
    if setting.name == "set_autograd_fallback_mode":
        return "warn" if value != "warn" else "nothing"
    raise AssertionError(f"no flipped value for {setting.name} ({value!r}): add one here")


_STRING_VALUES = {"set_cudnn_depthwise_kernel": ["auto", "cudnn", "native"]}


def _alternatives(setting: Setting, value: Any) -> list[Any]:
    members = getattr(type(value), "__members__", None)  # a pybind enum: every other member
    if members:
        return [m for m in members.values() if m != value]
    if setting.name in _STRING_VALUES:
        return [v for v in _STRING_VALUES[setting.name] if v != value]
    if setting.name == "num_threads":
        return [value + 1]
    return [_flipped(setting, value)]


# Covered settings no Python setter can change in this build (every other value is refused: the
# CPU build has neither cuSOLVER nor MAGMA); a request cannot change them here either.
_CONSTANT_HERE = {"set_linalg_preferred_backend"}


def test_the_record_covers_the_costly_getters_and_the_order_keeps_the_rest_first() -> None:
    covered = global_state._COVERED
    assert {"set_linalg_preferred_backend", "set_torch_function_state", "autocast[cpu]", "autocast_dtype[cpu]",
            "deterministic_algorithms", "grad_mode", "default_dtype"} <= covered
    names = [s.name for s in global_state._PLAIN_SETTINGS]
    assert sorted(names) == sorted(s.name for s in SETTINGS if not s.rng)
    assert all(name in covered for name in names[global_state._N_REST:])
    assert not any(name in covered for name in names[: global_state._N_REST])


def test_every_covered_setting_flipped_in_python_changes_the_record_and_it_follows_back() -> None:
    failures: list[str] = []

    def run() -> None:
        covered = _covered()
        values = [s.get() for s in covered]
        for setting in covered:
            before, record = setting.get(), _record()
            flipped = False
            for new in _alternatives(setting, before):
                try:
                    setting.set(new)
                    changed, python = _record(), setting.get()
                except (RuntimeError, TypeError, ValueError):  # refused in this build: the next value
                    continue
                finally:
                    setting.set(before)
                if python == before:
                    continue  # accepted, but no change in this build
                flipped = True
                if changed == record:
                    failures.append(f"{setting.name}: changed ({before!r} -> {python!r}), the record did not")
                # (back where every covered value was: a setter may move others)
                if [s.get() for s in covered] == values and _record() != record:
                    failures.append(f"{setting.name}: the record did not follow it back")
                _put_back(covered, values)
            if not flipped and setting.name not in _CONSTANT_HERE:  # else it is unchecked
                failures.append(f"{setting.name}: no Python setter call changed it here ({before!r})")

    _on_thread(run)
    assert not failures, "\n".join(failures)


_KEPT: list[Any] = []  # (a generator-based manager dropped at once would exit in its finaliser)


def _outcome(setting: Setting) -> Any:
    try:
        return setting.get()
    except RuntimeError as exc:  # (some getters refuse some states: the same states, every time)
        return ("raised", str(exc))


def _put_back(covered: list[Setting], values: list[Any]) -> None:
    for setting, value in zip(covered, values, strict=True):
        if setting.get() != value:
            setting.set(value)


def test_equal_records_mean_equal_values_over_random_changes() -> None:
    """Over a random walk of changes to the covered settings (through their setters, so also
    through whatever other settings a setter moves with it), any two moments with equal records
    have equal values: no covered getter depends on state the record does not read."""
    rng = random.Random(11)
    failures: list[str] = []

    def run() -> None:
        covered = _covered()
        original = [s.get() for s in covered]
        seen: dict[bytes, list[Any]] = {}
        try:
            for _ in range(300):
                setting = rng.choice(covered)
                try:
                    setting.set(rng.choice(_alternatives(setting, setting.get())))
                except (RuntimeError, TypeError, ValueError):
                    pass  # refused in this build
                values = list(map(_outcome, covered))
                first = seen.setdefault(_record(), values)
                if first != values:
                    failures.append(f"equal records, values {first} and {values}")
        finally:
            _put_back(covered, original)

    _on_thread(run)
    assert not failures, failures[0]


def _left_entered(manager: Any) -> None:
    manager.__enter__()  # never exited: what a request's abandoned context manager leaves
    _KEPT.append(manager)


@pytest.mark.parametrize("change", [
    lambda: _left_entered(torch.autocast("cpu", dtype=torch.bfloat16)),
    lambda: _left_entered(torch._C.DisableTorchFunction()),
    lambda: _left_entered(torch.backends.cudnn.flags(enabled=False, benchmark=True)),
    lambda: _left_entered(torch.sparse.check_sparse_tensor_invariants()),
    lambda: torch.backends.cuda.preferred_blas_library("ck"),
    lambda: torch._C._set_sdp_priority_order([4, 3, 2, 1, 0]),
], ids=["autocast_context", "disable_torch_function", "cudnn_flags", "sparse_invariants", "blas_library",
        "sdp_order"])
def test_a_covered_setting_changed_in_a_request_by_any_path_is_found_and_put_back(change: Callable[[], None]) -> None:
    """The record is read from the state itself, not from the setters: context managers left
    entered, C++ guards and library helpers change it as plainly as the setters."""
    out: list[Any] = []

    def run() -> None:
        values = [s.get() for s in global_state._PLAIN_SETTINGS]
        with state_restored():
            pass  # the first request on this thread: the next one is checked against its end
        changed: list[str] = []
        with state_restored(changed):
            change()
        out.extend([changed, [s.get() for s in global_state._PLAIN_SETTINGS] == values])

    _on_thread(run)
    _KEPT.clear()
    changed, restored = out
    assert any(name in global_state._COVERED for name in changed), changed
    assert restored


def test_a_covered_setting_changed_between_requests_is_found_at_the_next_start() -> None:
    out: list[list[str]] = []

    def run() -> None:
        with state_restored():
            pass
        torch.set_autocast_enabled("cpu", True)  # e.g. a leftover object's finaliser, after the end
        changed: list[str] = []
        with state_restored(changed):
            out.append([*changed])  # put back before the request's code runs
            assert not torch.is_autocast_enabled("cpu")
        out.append(changed)

    _on_thread(run)
    assert out[0] == ["autocast[cpu] (between requests)"]


def test_the_generators_drawn_from_in_a_request_are_put_back() -> None:
    out: list[Any] = []

    def run() -> None:
        torch_state, python_state = torch.random.get_rng_state(), random.getstate()
        with state_restored():
            torch.randn(5)
            torch.randn(1, dtype=torch.float64)  # the cached normal samples, too
            torch.normal(0.0, 1.0, size=(1,))
            random.random()
            random.gauss(0.0, 1.0)  # leaves `gauss_next`
        out.append(torch.equal(torch.random.get_rng_state(), torch_state) and random.getstate() == python_state)
        with state_restored():
            torch.manual_seed(1234)
            random.seed(1234)
        out.append(torch.equal(torch.random.get_rng_state(), torch_state) and random.getstate() == python_state)
        with state_restored():
            pass  # untouched: nothing set, still the same
        out.append(torch.equal(torch.random.get_rng_state(), torch_state) and random.getstate() == python_state)

    _on_thread(run)
    assert out == [True, True, True]


def test_the_generator_records_see_every_draw() -> None:
    """A record equal to the snapshot means an untouched generator: every kind of draw moves it."""
    cpu, python = global_state._GENERATORS
    draws: list[Callable[[], object]] = [
        lambda: torch.randn(1), lambda: torch.randn(1, dtype=torch.float64), lambda: torch.rand(1),
        lambda: torch.randint(0, 10, (1,)), lambda: torch.manual_seed(torch.initial_seed()),
    ]
    for draw in draws:
        snapshot = cpu.read()
        draw()
        assert cpu.read() != snapshot
    for pydraw in (random.random, lambda: random.gauss(0.0, 1.0), lambda: random.seed(random.getrandbits(8))):
        snapshot = python.read()
        pydraw()
        assert python.read() != snapshot
    random.gauss(0.0, 1.0)
    snapshot = python.read()
    random.gauss(0.0, 1.0)  # (uses the cached `gauss_next`: the words do not move, the cache does)
    assert python.read() != snapshot


def test_without_an_agreeing_record_every_getter_is_called(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = [s for s in SETTINGS if not s.rng]
    monkeypatch.setattr(global_state, "_NATIVE", None)
    assert global_state._settings_record(plain) == (None, frozenset())
    torch_rng = next(s for s in SETTINGS if s.name == "torch_rng")
    python_rng = next(s for s in SETTINGS if s.name == "python_rng")
    assert global_state._cpu_generator(torch_rng) == (torch_rng.get, torch_rng.set)
    assert global_state._python_generator(python_rng) == (python_rng.get, python_rng.set)

    class Stale:  # a build that names a setting this module does not have
        @staticmethod
        def names() -> tuple[str, ...]:
            return ("set_fwd_grad_enabled", "_set_renamed")

    monkeypatch.setattr(global_state, "_NATIVE", Stale)
    assert global_state._settings_record(plain) == (None, frozenset())
