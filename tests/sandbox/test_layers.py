"""Each sandbox layer on its own: guards really called, state restored, seccomp, limits, proxies."""

from __future__ import annotations

import random
import resource
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from model_runtime.sandbox import CapabilityDenied, CodeRejected, LimitExceeded, ModelTampering
from model_runtime.sandbox.capabilities import Capabilities
from model_runtime.sandbox.compiling import restricted_compile
from model_runtime.sandbox.guards import Guards
from model_runtime.sandbox.limits import Worker, address_space_cap
from model_runtime.sandbox.model_guard import ProcessState, WeightGuard
from model_runtime.sandbox.seccomp import supported as seccomp_supported


def _run(source: str, guards: Guards) -> dict[str, Any]:
    namespace = guards.namespace()
    exec(restricted_compile(source, "<test>"), namespace)
    return namespace


# -- layer 2: the compiler and its guards ----------------------------------------------------------


def test_guards_are_really_called() -> None:
    guards = Guards(Capabilities(), lambda _v: False)
    source = "x = [1, 2]\ny = x[0]\nz = x.count(1)\nfor a, b in [(1, 2)]:\n    pass\nx[0] = 5\nq = 1\nq += 2\n"
    ns = _run(source, guards)
    counts = guards.counters
    assert (counts.getattr, counts.getitem, counts.write, counts.inplace) >= (1, 1, 1, 1)
    assert counts.iter >= 1
    assert ns["x"] == [5, 2] and ns["q"] == 3


def test_stock_compile_would_not_call_them() -> None:
    # Why NDIF's guards were inert: code compiled with compile() never calls `_getattr_`.
    guards = Guards(Capabilities(), lambda _v: False)
    namespace = guards.namespace()
    exec(compile("z = [1].count(1)", "<t>", "exec"), namespace)
    assert guards.counters.getattr == 0


@pytest.mark.parametrize(
    "source",
    ["().__class__", "x = 1\ndef f():\n    global x\n", "import os as _os", "(lambda: 1).__code__",
     "try:\n    pass\nexcept* ValueError:\n    pass\n"],
)
def test_compiler_rejects(source: str) -> None:
    with pytest.raises(CodeRejected):
        restricted_compile(source, "<test>")


def test_bare_except_cannot_swallow_base_exceptions() -> None:
    guards = Guards(Capabilities(), lambda _v: False)

    def boom() -> None:
        raise KeyboardInterrupt

    namespace = guards.namespace()
    namespace["boom"] = boom
    with pytest.raises(KeyboardInterrupt):
        exec(restricted_compile("try:\n    boom()\nexcept:\n    pass\n", "<t>"), namespace)


def test_printed_output_is_capped() -> None:
    lines: list[str] = []
    guards = Guards(Capabilities(), lambda _v: False, on_print=lines.append, max_print_bytes=100)
    _run("for i in range(1000):\n    print('0123456789')", guards)
    assert len(lines) < 20 and lines[-1].startswith("[sandbox] output truncated")


def test_print_goes_to_the_log() -> None:
    lines: list[str] = []
    _run("print('hello', 42)", Guards(Capabilities(), lambda _v: False, on_print=lines.append))
    assert lines == ["hello 42"]


# -- layer 3: capabilities --------------------------------------------------------------------------


def test_module_proxies() -> None:
    caps = Capabilities()
    torch_proxy = caps.proxy("torch")
    assert torch_proxy.ones(2).sum().item() == 2.0
    for name in ("load", "save", "from_file", "hub", "utils", "ops", "_C"):
        with pytest.raises(CapabilityDenied):
            getattr(torch_proxy, name)
    with pytest.raises(CapabilityDenied):
        torch_proxy.ones = None
    assert "load" not in dir(torch_proxy)
    assert caps.guarded_import("torch.nn.functional", fromlist=("relu",)).relu(torch.tensor([-1.0])).item() == 0
    with pytest.raises(CapabilityDenied):
        caps.guarded_import("os")


def test_empty_hands_out_zeroed_memory() -> None:
    proxy = Capabilities().proxy("torch")
    garbage = torch.full((4096,), 7.0)
    del garbage  # the allocator may hand this block straight back
    assert torch.count_nonzero(proxy.empty(4096)).item() == 0
    assert torch.count_nonzero(proxy.empty_like(torch.ones(64))).item() == 0
    assert torch.count_nonzero(proxy.empty_strided((8, 8), (8, 1))).item() == 0


def test_proxied_functions_refuse_protected_out() -> None:
    weight = torch.ones(3)
    caps = Capabilities(is_protected=lambda v: v is weight)
    with pytest.raises(CapabilityDenied):
        caps.proxy("torch").add(weight, 1, out=weight)
    with pytest.raises(CapabilityDenied):
        caps.proxy("torch.nn.init").zeros_(weight)
    assert torch.equal(weight, torch.ones(3))


# -- layer 4: model and process state ---------------------------------------------------------------


def test_weight_guard_protects_views_and_detects_missed_writes() -> None:
    layer = torch.nn.Linear(4, 4)
    guard = WeightGuard([layer])
    assert guard.is_protected(layer.weight.detach()[0]) and guard.is_protected(layer.bias)
    assert not guard.is_protected(torch.ones(2))
    guard.arm()
    guard.check()
    with torch.no_grad():
        layer.weight.detach().mul_(2)  # a write none of the guards saw: the version counter did
    with pytest.raises(ModelTampering):
        guard.check()


def test_weight_guard_follows_the_model_to_new_storage() -> None:
    layer = torch.nn.Linear(4, 4)
    guard = WeightGuard([layer])
    layer.to(torch.float64)  # like WARM -> HOT: same Parameter objects, new storage
    guard.arm()
    assert guard.is_protected(layer.weight.detach()[0])


def test_weights_changed_behind_the_guards_make_the_sandbox_unhealthy() -> None:
    from model_runtime.sandbox import Sandbox

    class Wrapper:  # stands in for an nnsight model: the sandbox only needs `_module`
        _module = torch.nn.Linear(2, 2)

    box, model = Sandbox(), Wrapper()
    ctx = box.context(model)
    assert box.healthy
    with torch.no_grad():
        model._module.weight.mul_(2)
    with pytest.raises(ModelTampering):
        ctx.weights.check()
    assert not box.healthy


def test_process_state_is_restored() -> None:
    # Critical modules no other thread of this process imports (Ray's threads run here, in the
    # runtime tests' session: a replaced `json` or `os` would break them).
    import RestrictedPython
    import zstandard

    state = ProcessState.capture()
    py_before = random.random
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(not torch.is_grad_enabled())
    sys.modules["RestrictedPython"] = None  # type: ignore[assignment]
    sys.modules["sandbox_test_fake"] = sys
    sys.modules["zstandard"] = sys
    import builtins

    builtins.evil = 1  # type: ignore[attr-defined]
    changed = state.restore()
    del sys.modules["sandbox_test_fake"]
    assert torch.get_default_dtype() == torch.float32
    assert sys.modules["RestrictedPython"] is RestrictedPython and sys.modules["zstandard"] is zstandard
    assert not hasattr(builtins, "evil") and random.random is py_before
    assert {"default_dtype", "grad_mode", "builtins", "sys.modules grew", "sys.modules['zstandard']"} <= set(changed)



def test_process_state_reads_only_written_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The builtins and `sys.modules` snapshots are shared while the tables' version tags hold;
    any write moves the tag, so a change is still found and put back, and without a trustworthy
    tag every table is compared as before."""
    import builtins

    from model_runtime.sandbox import dict_versions, model_guard

    assert dict_versions.dict_version is not None  # (so the version-tag path is what is tested)
    first, second = ProcessState.capture(), ProcessState.capture()
    assert second.builtins_dict is first.builtins_dict and second.critical_modules is first.critical_modules
    assert second.restore() == []
    builtins.planted = 1  # type: ignore[attr-defined]
    del builtins.planted  # type: ignore[attr-defined]
    assert second.restore() == []  # written back as it was: compared, nothing to report
    third = ProcessState.capture()
    assert third.builtins_dict is not first.builtins_dict and third.builtins_dict == first.builtins_dict
    # Entries no other thread of this process uses (Ray's threads run here, in the runtime tests'
    # session: a replaced `len` or `os` would break them).
    real_copyright = builtins.copyright
    vars(builtins).update(copyright=print)
    real_module = sys.modules["RestrictedPython"]
    sys.modules.update(RestrictedPython=sys)
    assert {"builtins", "sys.modules['RestrictedPython']"} <= set(third.restore())
    assert builtins.copyright is real_copyright and sys.modules["RestrictedPython"] is real_module
    monkeypatch.setattr(dict_versions, "dict_version", None)
    fourth = ProcessState.capture()
    assert fourth.builtins_version is None and fourth.modules_version is None
    builtins.planted = 2  # type: ignore[attr-defined]
    assert "builtins" in fourth.restore() and not hasattr(builtins, "planted")
    assert model_guard._BUILTINS.current()[0] is None


def test_rng_is_restored_after_a_request(models: tuple[Any, Any], backend: Any) -> None:
    from sandbox.legit_programs import PROMPT

    client = models[0]
    state = torch.random.get_rng_state().clone()
    with client.trace(PROMPT, backend=backend()):
        torch.manual_seed(7)
        r = torch.rand(2).save()
    assert r.shape == (2,)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_shared_containers_are_copied_not_mutated(models: tuple[Any, Any], backend: Any) -> None:
    from sandbox.legit_programs import PROMPT

    client, server = models
    before = dict(server.tokenizer.init_kwargs)
    with client.trace(PROMPT, backend=backend()):
        kwargs = client.tokenizer.init_kwargs
        kwargs["model_max_length"] = 1
        n = torch.tensor(len(kwargs)).save()
    assert int(n) >= 1
    assert server.tokenizer.init_kwargs == before


def test_meta_reports_guard_calls_and_layers(models: tuple[Any, Any], backend: Any) -> None:
    from sandbox.legit_programs import invokes

    be = backend(production=False)
    invokes(models[0], be)
    meta = be.meta_out["sandbox"]
    assert meta["guard_calls"]["getattr"] > 0  # the inner invoke blocks ran restricted code too
    assert meta["seccomp"] is seccomp_supported()
    assert set(meta["timings"]) >= {"deserialize_s", "execute_s", "serialize_s", "restore_s"}


# -- layer 5: limits and seccomp ---------------------------------------------------------------------


@pytest.mark.skipif(not seccomp_supported(), reason="the filter is built for Linux x86_64")
def test_seccomp_worker_denies_exec_socket_and_writes(tmp_path: Path) -> None:
    worker = Worker(seccomp=True)
    try:
        assert worker.seccomp_active, worker.seccomp_error
        target = tmp_path / "x"

        def attempts() -> dict[str, str]:
            out = {}
            for name, action in {
                "write": lambda: open(target, "w"),
                "socket": lambda: socket.socket(),
                "exec": lambda: subprocess.run(["true"], check=False),
            }.items():
                try:
                    action()
                    out[name] = "allowed"
                except PermissionError:
                    out[name] = "denied"
            out["read"] = str(len(Path(__file__).read_text()) > 0)
            return out

        assert worker.run(attempts, 10, 1) == {"write": "denied", "socket": "denied", "exec": "denied", "read": "True"}
        assert not target.exists()
        target.write_text("main thread unaffected")
    finally:
        worker.stop()


@pytest.mark.parametrize("write_opens", [True, False])
def test_seccomp_program_is_well_formed(write_opens: bool) -> None:
    from model_runtime.sandbox import seccomp

    prog = seccomp.build(seccomp.request_policy(write_opens))
    for pc, (code, jt, jf, _k) in enumerate(prog):
        if code & 0x07 == 0x05:  # BPF_JMP: both targets inside the program
            assert pc + 1 + max(jt, jf) < len(prog)
    assert prog[-1] == (0x06, 0, 0, 0x7FFF0000)  # falls through to ALLOW
    opens = [insn for insn in prog if insn[0] == 0x15 and insn[3] in (2, 257)]
    assert bool(opens) is not write_opens


def test_timeout_stops_the_job_and_the_worker_survives() -> None:
    worker = Worker(seccomp=False)
    try:

        def spin() -> None:
            while True:
                try:
                    while True:
                        pass
                except Exception:
                    pass

        with pytest.raises(LimitExceeded, match="stopped"):
            worker.run(spin, 0.3, 2.0)
        assert worker.healthy and worker.run(lambda: 41 + 1, 5, 1) == 42
    finally:
        worker.stop()


def test_address_space_cap_is_applied_and_lifted() -> None:
    before = resource.getrlimit(resource.RLIMIT_AS)
    with address_space_cap(256 * 1024 * 1024), pytest.raises(RuntimeError, match="allocate"):
        torch.ones(2**30)  # 4 GiB
    assert resource.getrlimit(resource.RLIMIT_AS) == before



def test_a_forked_child_reads_its_own_address_space() -> None:
    """The kept-open /proc/self/statm is the opening process's: a forked child opens its own."""
    import os

    from model_runtime.sandbox import limits

    assert limits._address_space_bytes() is not None and limits._STATM is not None
    parent_file = os.readlink(f"/proc/self/fd/{limits._STATM}")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only plain os calls, then _exit
        try:
            limits._address_space_bytes()
            os.write(write, os.readlink(f"/proc/self/fd/{limits._STATM}").encode())
        finally:
            os._exit(0)
    os.close(write)
    child_file = os.read(read, 4096).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert parent_file == f"/proc/{os.getpid()}/statm" and child_file == f"/proc/{pid}/statm"


def test_restricted_compile_of_a_printing_block_emits_no_warning() -> None:
    # A request's stderr is streamed to its user as LOG: RestrictedPython's own SyntaxWarning
    # about its `printed` bookkeeping must not reach it.
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restricted_compile("print('hello from a fresh block 7f3a')\n", "<printing-block>")
    assert [str(w.message) for w in caught] == []
