"""Global state: every torch setter is restored after a request or unreachable from one.

The setters are enumerated from torch itself (`torch.set_*`/`use_*`, `torch._C._set_*`,
`torch.autograd.set_*`, `torch.backends.*` flags and switches), not listed by hand.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import random
import sys
import threading
import warnings
from typing import Any

import pytest
import torch

from model_runtime.sandbox.capabilities import Capabilities
from model_runtime.sandbox.errors import CapabilityDenied
from model_runtime.sandbox.global_state import SETTINGS, GlobalState, Setting, state_restored

_SWITCH_PREFIXES = ("set_", "use_", "enable_", "allow_", "preferred_")


def torch_setters() -> set[str]:
    names = {f"torch.{n}" for n in dir(torch) if n.startswith(("set_", "use_")) and callable(getattr(torch, n))}
    names |= {f"torch._C.{n}" for n in dir(torch._C) if n.startswith("_set_")}
    names |= {f"torch.autograd.{n}" for n in dir(torch.autograd) if n.startswith("set_")}
    for info in pkgutil.iter_modules(torch.backends.__path__):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"torch.backends.{info.name}")
        except ImportError:
            continue
        prefix = f"torch.backends.{info.name}"
        for name in dir(module):
            if name.startswith("_"):
                continue
            value = getattr(module, name, None)
            if callable(value) and name.startswith(_SWITCH_PREFIXES):
                names.add(f"{prefix}.{name}")
        # flags are properties on the module object's class (torch.backends.cudnn.enabled, ...)
        for name, value in vars(type(module)).items():
            if not name.startswith("_") and hasattr(value, "__set__"):
                names.add(f"{prefix}.{name}")
    names |= {f"torch.backends.cuda.matmul.{n}" for n in (
        "allow_tf32", "allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction",
        "allow_fp16_accumulation", "fp32_precision")}
    return names


def unreachable(name: str) -> str | None:
    """Why sandboxed code cannot reach `name` (the capability layer's refusal), or None."""
    parts = name.split(".")
    caps = Capabilities()
    try:
        target: Any = caps.proxy(parts[0]) if parts[0] in caps.allowed else None
        if target is None:
            return f"module {parts[0]!r} is not importable in the sandbox"
        for part in parts[1:]:
            target = getattr(target, part)
    except CapabilityDenied as exc:
        return str(exc)
    except AttributeError:
        return "not an attribute of the proxied module"
    return None


def test_every_torch_setter_is_restored_or_unreachable() -> None:
    covered = {name for setting in SETTINGS for name in setting.covers}
    setters = torch_setters()
    assert len(setters) > 100
    neither = sorted(name for name in setters - covered if unreachable(name) is None)
    assert not neither, f"reachable from a request and not restored: {neither}"


def test_the_setters_a_request_can_reach_are_all_restored() -> None:
    reachable = {name for name in torch_setters() if unreachable(name) is None}
    covered = {name for setting in SETTINGS for name in setting.covers}
    assert reachable <= covered


_ALTERNATIVES: dict[str, Any] = {
    "default_dtype": torch.float64,
    "default_device": torch.device("meta"),
    "float32_matmul_precision": "medium",
    "num_threads": torch.get_num_threads() + 1,
    "print_options": (1, 5, 1, 40, True),
    "recursion_limit": sys.getrecursionlimit() + 7,
    "switch_interval": sys.getswitchinterval() * 2,
    "int_max_str_digits": 6000,
    "trace": lambda *_a: None,
    "profile": lambda *_a: None,
    "autocast_nesting": 2,
    "deterministic_algorithms": (True, True),
    "anomaly_mode": (True, False),
    "set_qengine": 0,
    "set_cudnn_depthwise_kernel": "native",
    "set_autograd_fallback_mode": "nothing",
    "distributions.validate_args": False,
}


def _perturbed(setting: Setting, value: Any) -> Any:
    if setting.name in _ALTERNATIVES:
        return _ALTERNATIVES[setting.name]
    if isinstance(value, bool):
        return not value
    if isinstance(value, tuple) and value and all(isinstance(v, bool) for v in value):
        return tuple(not v for v in value)
    if isinstance(value, torch.dtype):
        return torch.float16 if value != torch.float16 else torch.bfloat16
    return None


def test_each_setting_changed_on_the_thread_is_put_back() -> None:
    exercised: list[str] = []
    errors: list[str] = []

    def run() -> None:
        for setting in SETTINGS:
            if setting.rng:
                continue
            before = setting.get()
            new = _perturbed(setting, before)
            if new is None:
                continue
            changed: list[str] = []
            try:
                with state_restored(changed):
                    setting.set(new)
            except Exception:  # not changeable on this machine (e.g. fp16 CPU paths, quantized engines)
                assert setting.get() == before, setting.name
                continue
            after = setting.get()
            if after != before or not changed:  # (aliases of one flag may report another's name)
                errors.append(f"{setting.name}: {before!r} -> {after!r}, reported {changed}")
            exercised.append(setting.name)

    worker = threading.Thread(target=run)  # as on a request thread: thread-local state is its own
    worker.start()
    worker.join()
    assert not errors, "\n".join(errors)
    assert len(exercised) >= 50, exercised


def test_process_globals_and_rng_are_put_back() -> None:
    state = GlobalState.capture()
    draw, py_draw = torch.rand(3), random.random()  # what the captured RNG states give next
    torch.manual_seed(0)
    random.seed(5)
    warnings.simplefilter("ignore")
    os.environ["NDIF_TEST_INJECTED"] = "1"
    torch.set_default_device("meta")
    changed = state.restore()
    assert "NDIF_TEST_INJECTED" not in os.environ
    assert {"warnings", "environ", "default_device"} <= set(changed)
    assert torch.get_default_device() == torch.device("cpu")
    assert torch.equal(torch.rand(3), draw) and random.random() == py_draw  # the captured RNG states again


def test_a_change_between_requests_is_undone_at_the_next_start() -> None:
    def run() -> list[str]:
        with state_restored():
            pass
        torch.set_grad_enabled(False)  # e.g. a finaliser left by a request, run at collection
        changed: list[str] = []
        with state_restored(changed):
            assert torch.is_grad_enabled()
        return changed

    out: list[list[str]] = []
    worker = threading.Thread(target=lambda: out.append(run()))
    worker.start()
    worker.join()
    assert out == [["grad_mode (between requests)"]]


@pytest.mark.parametrize("mode", ["inference", "no_grad"])
def test_a_mode_entered_and_never_left_is_put_back(mode: str) -> None:
    def run() -> bool:
        with state_restored():
            ctx = torch.inference_mode() if mode == "inference" else torch.no_grad()
            ctx.__enter__()  # a suspended generator holding the `with` open does the same
        return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()

    out: list[bool] = []
    worker = threading.Thread(target=lambda: out.append(run()))
    worker.start()
    worker.join()
    assert out == [True]


def test_a_collection_outside_a_request_leaves_the_collecting_thread_state() -> None:
    """A request's object finalised on another thread (here: by a collection on this one) cannot
    change that thread's dispatch key sets, grad or inference mode (sandbox/finalisers.py)."""
    import gc

    from model_runtime.sandbox.finalisers import keep_thread_state_across_collections
    from model_runtime.sandbox.global_settings import set_inference_mode

    keep_thread_state_across_collections()

    def state() -> tuple[Any, ...]:
        return (torch._C._dispatch_tls_local_include_set().raw_repr(),
                torch._C._dispatch_tls_local_exclude_set().raw_repr(),
                torch.is_grad_enabled(), torch.is_inference_mode_enabled())

    class Finalised:
        def __del__(self) -> None:
            set_inference_mode(True)
            torch._C._dispatch_tls_set_dispatch_key_included(torch._C.DispatchKey.Python, True)
            torch._C._set_grad_enabled(False)

    def run() -> tuple[Any, ...]:
        before = state()
        obj = Finalised()
        obj.cycle = obj  # type: ignore[attr-defined]
        del obj
        gc.collect()
        assert state() == before
        return before

    run()
    seen: list[Any] = []
    worker = threading.Thread(target=lambda: seen.append(run()))  # a thread that never ran a request
    worker.start()
    worker.join()
    assert len(seen) == 1


def test_the_opt_einsum_reading_follows_any_write_to_either_dict() -> None:
    """Its value is read again only once one of its two dicts was written (their version tags):
    every kind of write, to either, is seen, and a write back gives the recorded value again."""
    from model_runtime.sandbox.global_settings import _opt_einsum, _set_opt_einsum

    flags: Any = torch.backends.opt_einsum
    own, module = vars(flags), vars(flags.m)
    before = _opt_einsum()
    writes = [
        lambda: own.__setitem__("enabled", not module["enabled"]),
        lambda: own.update(strategy="greedy"),
        lambda: module.__setitem__("strategy", "optimal"),
        lambda: dict.__setitem__(module, "enabled", not module["enabled"]),
    ]
    try:
        for write in writes:
            read = _opt_einsum()
            write()
            assert _opt_einsum() != read
    finally:
        _set_opt_einsum(before)
    assert _opt_einsum() == before


def test_opt_einsum_flags_are_put_back_in_both_places_they_live() -> None:
    """`torch.backends.opt_einsum`'s flags are the module object's own entries once assigned, else
    the original module's globals (what `set_flags` changes): both are put back."""
    flags: Any = torch.backends.opt_einsum
    before = (flags.enabled, flags.strategy)
    changed: list[str] = []
    with state_restored(changed):
        flags.enabled, flags.strategy = not before[0], "greedy"
        vars(flags.m)["enabled"] = not before[0]
    assert (flags.enabled, flags.strategy) == before and vars(flags.m)["enabled"] == before[0]
    assert "enabled" not in vars(flags) and "opt_einsum" in changed
