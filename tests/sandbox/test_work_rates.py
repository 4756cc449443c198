"""The replica's rates, measured once per process at start-up (`work_bounds.rates`): a load spike
while they are measured must not leave them far low for the replica's whole life (every heavy
research op would then be over-priced and refused). Simulated spikes: a clock that runs 100x fast
for part of the measurement, as a core lost to another process makes a wall clock do."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from model_runtime.sandbox.work_bounds import rates


def _spiking(clock: Callable[[], float], spiked: Callable[[int], bool]) -> Callable[[], float]:
    """`clock`, except that while `spiked(call number)` its time runs 100x fast."""
    state = {"calls": 0, "last": clock(), "offset": 0.0}

    def read() -> float:
        now = clock()
        if spiked(state["calls"]):
            state["offset"] += 99.0 * (now - state["last"])
        state["calls"] += 1
        state["last"] = now
        return now + state["offset"]

    return read


def _flat(measured: dict[str, Any]) -> dict[str, float]:
    return {**{f"flops {k}": v for k, v in measured["cpu_flops"].items()},
            **{k: v for k, v in measured.items() if k.startswith("cpu_") and k != "cpu_flops"}}


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a replica's setting
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("clock", ["_thread_seconds", "_wall_seconds"])
def test_a_load_spike_during_one_round_does_not_lower_the_rates(clock: str, one_thread: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _flat(rates._measure())
    calls_per_round = 2 * rates.REPEATS * len(rates._probes(torch))  # two clock reads per timed call
    monkeypatch.setattr(rates, clock, _spiking(getattr(rates, clock), lambda n: n < calls_per_round))
    if clock == "_wall_seconds":
        monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # several torch threads: wall time
    spiked = _flat(rates._measure())
    # Every rate within noise of the unspiked one (a spike-set rate would be ~100x low).
    low = {name: reference[name] / spiked[name] for name in reference if spiked[name] < reference[name] / 10}
    assert not low, low


def test_with_one_torch_thread_waiting_for_a_core_does_not_count(one_thread: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica runs one torch thread: its calls are timed in the thread's CPU time, so a wall
    clock that races through the whole measurement (a core held by others throughout) changes
    nothing."""
    monkeypatch.setattr(rates, "_wall_seconds", _spiking(time.perf_counter, lambda n: True))
    seen: list[str] = []
    thread_seconds = rates._thread_seconds
    monkeypatch.setattr(rates, "_thread_seconds", lambda: (seen.append("thread"), thread_seconds())[1])
    probes = {"mm": (2.0 * 64**3, lambda: torch.ones(64, 64) @ torch.ones(64, 64))}
    rates._best_of_rounds(probes, single_thread=True)
    assert seen and len(seen) == 2 * rates.REPEATS * rates.ROUNDS
