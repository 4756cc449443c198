"""Layer 1: crafted blobs. The allowlisted unpickler refuses every global real payloads don't use."""

from __future__ import annotations

import io
import os
import pickle
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard
from nnsight.schema.request import RequestModel

from model_runtime.sandbox import Limits, PayloadRejected, SandboxError
from model_runtime.sandbox.limits import LimitExceeded
from model_runtime.sandbox.unpickling import ALLOWED_GLOBALS, SUBSTITUTED_GLOBALS, SandboxUnpickler
from sandbox.attacks import TARGET
from sandbox.harness import weights_digest
from sandbox.legit_programs import PROGRAMS, save_logits


class _Reduce:
    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> Any:
        return self.fn, self.args


def _envelope(**kw: Any) -> RequestModel:
    return RequestModel(model_key="tiny", **kw)


def _persid(pid: str) -> bytes:
    return b"\x8c" + bytes([len(pid)]) + pid.encode() + b"Q"  # SHORT_BINUNICODE + BINPERSID


def _short(text: str) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text.encode()


def _global(module: str, name: str) -> bytes:
    return _short(module) + _short(name) + b"\x93"  # STACK_GLOBAL


def _server_state(server: Any) -> dict[str, Any]:
    """What a crafted stream could change besides the weights: the allowlisted globals' attributes
    and the attributes of every server module the stream can reach by persistent id (the other
    one, the Interleaver, is reset by the server after every request anyway)."""
    from model_runtime.sandbox.unpickling import ALLOWED_GLOBALS, _resolve

    state: dict[str, Any] = {}
    for key in sorted(ALLOWED_GLOBALS):
        obj = _resolve(key)
        state[".".join(key)] = (dict(vars(obj)) if hasattr(obj, "__dict__") else None,
                                getattr(obj, "__defaults__", None))
    for pid, obj in server._remoteable_persistent_objects().items():
        if pid.startswith("Module:"):
            state[pid] = {name: id(value) for name, value in vars(obj).items()}
    return state


def _crafted() -> dict[str, bytes]:
    import cloudpickle.cloudpickle as cp
    from nnsight.intervention import serialization
    from nnsight.modeling.transformers import TransformersModel

    inner = pickle.dumps(_Reduce(os.system, f"touch {TARGET}"))
    return {
        "os_system_reduce": pickle.dumps(_Reduce(os.system, f"touch {TARGET}")),
        "exec_reduce": pickle.dumps(_Reduce(exec, f"open({TARGET!r}, 'w')")),
        "eval_in_tuple": pickle.dumps((1, _Reduce(eval, "1"))),
        "nested_torch_load": pickle.dumps(_Reduce(torch.storage._load_from_bytes, inner)),
        "subimport_os": pickle.dumps(_Reduce(cp.subimport, "os")),
        "builtin_codetype": pickle.dumps(_Reduce(cp._builtin_type, "CodeType")),
        "fill_server_function": pickle.dumps(_Reduce(serialization._fill, TransformersModel._call, {"torch": None})),
        "dotted_globals_walk": b"cnnsight.modeling.transformers\nTransformersModel._call.__globals__\n.",
        "not_a_tracer": pickle.dumps((1, 2)),
        "unknown_persistent_id": b"\x80\x04" + _persid("Module:evil") + b".",
        "garbage": b"\x00\x01not a pickle",
    }


def _opcode_attacks() -> dict[str, bytes]:
    """Hand-assembled streams that try to modify the server's live objects while loading."""
    head, lm_head, layers = b"\x80\x04", "Module:model.lm_head", "Module:model.model.layers"
    return {
        # BUILD(<lm_head>, {"_parameters": {}}): would drop the served weights.
        "build_on_server_module": head + _persid(lm_head) + b"}" + _short("_parameters") + b"}sb.",
        # layers.append(lm_head): would change the model's structure.
        "append_to_server_modulelist": head + _persid(layers) + b"(" + _persid(lm_head) + b"e.",
        # layers[0] = lm_head
        "setitem_on_server_modulelist": head + _persid(layers) + b"K\x00" + _persid(lm_head) + b"s.",
        # BUILD(TransformersModel, (None, {"_call": None})): slot state = setattr on the class.
        "build_slotstate_on_class": head + _short("nnsight.modeling.transformers") + _short("TransformersModel")
        + b"\x93N}" + _short("_call") + b"N" + b"s\x86b.",
        # Envoy(<lm_head>): REDUCE runs a class's __init__ on a server module.
        "reduce_class_init": head + _short("nnsight.intervention.envoy") + _short("Envoy") + b"\x93"
        + _persid(lm_head) + b"\x85R.",
        # Protocol-0 INST without arguments is NEWOBJ: it builds a fresh OrderedDict, which loads
        # and is then refused by the shape check (INST with an argument is a call, below).
        "inst_opcode": b"(icollections\nOrderedDict\n.",
        # INST with an argument is a call: Envoy(<lm_head>) would run __init__ on a server module.
        "inst_class_init": head + b"(" + _persid(lm_head) + b"innsight.intervention.envoy\nEnvoy\n.",
        # BUILD on MethodType(TransformersModel._call, <lm_head>): a bound method's __dict__ is the
        # server function's, so this would set TransformersModel._call.pwned for every request.
        "build_on_bound_method": head + _global("cloudpickle.cloudpickle", "_builtin_type") + _short("MethodType")
        + b"\x85R" + _global("nnsight.modeling.transformers", "TransformersModel._call") + _persid(lm_head)
        + b"\x86R}" + _short("pwned") + b"Nsb.",
        # The same bound method made with NEWOBJ instead of REDUCE.
        "build_on_newobj_bound_method": head + _global("cloudpickle.cloudpickle", "_builtin_type")
        + _short("MethodType") + b"\x85R" + _global("nnsight.modeling.transformers", "TransformersModel._call")
        + _persid(lm_head) + b"\x86\x81}" + _short("pwned") + b"Nsb.",
        # Slot-state BUILD on an allowlisted function: setattr(_rebuild_tensor_v2, "__defaults__", ()).
        "build_slotstate_on_function": head + _global("torch._utils", "_rebuild_tensor_v2") + b"N}"
        + _short("__defaults__") + b")s\x86b.",
        # BUILD on an allowlisted constant (a dtype).
        "build_on_dtype": head + _global("torch", "float32") + b"}" + _short("pwned") + b"Nsb.",
        # layers[0] = lm_head through SETITEMS, and a set-style ADDITEMS on the server's ModuleList.
        "setitems_on_server_modulelist": head + _persid(layers) + b"(K\x00" + _persid(lm_head) + b"u.",
        "additems_on_server_modulelist": head + _persid(layers) + b"(" + _persid(lm_head) + b"\x90.",
        # Calling a server function directly: TransformersModel._call(<lm_head>).
        "reduce_server_function": head + _global("nnsight.modeling.transformers", "TransformersModel._call")
        + _persid(lm_head) + b"\x85R.",
        # A fresh Envoy whose state lists server objects as its children: Envoy.__setstate__ would
        # set `_parent` on the served lm_head and on the TransformersModel class.
        "envoy_children_are_server_objects": head + _global("nnsight.intervention.envoy", "Envoy") + b")\x81}"
        + _short("_children") + b"](" + _persid(lm_head)
        + _global("nnsight.modeling.transformers", "TransformersModel") + b"esb.",
        # Truncated stream and an unknown opcode.
        "truncated": head + _short("nnsight.intervention.envoy"),
        "unknown_opcode": head + b"\xff.",
    }


CRAFTED = _crafted() | _opcode_attacks()

# The refusal each blob must meet (so a blob refused by the wrong check, or only by a later one,
# fails the test).
REFUSED_BY = {
    "os_system_reduce": "references posix.system",
    "exec_reduce": "references builtins.exec",
    "eval_in_tuple": "references builtins.eval",
    "nested_torch_load": "refused by the weights-only loader",
    "subimport_os": "imports module 'os'",
    "builtin_codetype": "builtin type 'CodeType'",
    "fill_server_function": "set globals of a function it did not ship",
    "dotted_globals_walk": "TransformersModel._call.__globals__, which is not allowed",
    "not_a_tracer": "not a (tracer, block) pair",
    "unknown_persistent_id": "UnknownPersistentIdError: Module:evil",
    "garbage": "could not be read",
    "build_on_server_module": "modify the server's Module:model.lm_head (BUILD)",
    "append_to_server_modulelist": "modify the server's Module:model.model.layers (APPEND)",
    "setitem_on_server_modulelist": "modify the server's Module:model.model.layers (SETITEM)",
    "build_slotstate_on_class": "modify nnsight.modeling.transformers.TransformersModel (BUILD)",
    "reduce_class_init": "calls nnsight.intervention.envoy.Envoy",
    "inst_opcode": "not a (tracer, block) pair",
    "inst_class_init": "calls nnsight.intervention.envoy.Envoy",
    "build_on_bound_method": "modify a bound method with BUILD",
    "build_on_newobj_bound_method": "modify a bound method with BUILD",
    "build_slotstate_on_function": "modify torch._utils._rebuild_tensor_v2 (BUILD)",
    "build_on_dtype": "modify torch.float32 (BUILD)",
    "setitems_on_server_modulelist": "modify the server's Module:model.model.layers (SETITEM)",
    "additems_on_server_modulelist": "modify the server's Module:model.model.layers (ADDITEMS)",
    "reduce_server_function": "calls nnsight.modeling.transformers.TransformersModel._call",
    "envoy_children_are_server_objects": "links children it did not create",
    "truncated": "could not be read",
    "unknown_opcode": "could not be read",
}


@pytest.fixture(scope="module")
def reference(models: tuple[Any, Any]) -> dict[str, Any]:
    return save_logits(models[1], None)


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_blob_is_refused(
    name: str, models: tuple[Any, Any], sandbox: Any, backend: Any, reference: Any
) -> None:
    client, server = models
    before, globals_before = weights_digest(server), _server_state(server)
    with pytest.raises(PayloadRejected) as info:
        sandbox.execute(server, CRAFTED[name], _envelope())
    assert "[deserialisation]" in str(info.value)
    assert REFUSED_BY[name] in str(info.value)
    assert not Path(TARGET).exists()
    assert weights_digest(server) == before
    assert _server_state(server) == globals_before
    assert torch.equal(save_logits(client, backend())["logits"], reference["logits"])


def test_zstd_bomb_is_stopped(models: tuple[Any, Any], sandbox: Any) -> None:
    bomb = zstandard.ZstdCompressor(level=3).compress(b"\0" * (4 * 1024 * 1024))
    assert len(bomb) < 4096
    with pytest.raises(LimitExceeded, match="decompresses past"):
        sandbox.execute(models[1], bomb, _envelope(compress=True), limits=Limits(max_decompressed_bytes=1024 * 1024))


def test_oversized_payload_is_refused(models: tuple[Any, Any], sandbox: Any) -> None:
    with pytest.raises(LimitExceeded, match="exceeds"):
        sandbox.execute(models[1], b"x" * 2000, _envelope(), limits=Limits(max_payload_bytes=1000))


def test_env_cannot_load_an_adapter(models: tuple[Any, Any], sandbox: Any) -> None:
    with pytest.raises(PayloadRejected, match="peft"):
        sandbox.execute(models[1], CRAFTED["not_a_tracer"], _envelope(env={"peft": "evil/adapter"}))


def test_model_call_cannot_be_swapped(models: tuple[Any, Any], backend: Any) -> None:
    from nnsight.modeling.transformers import TransformersModel

    client, _server = models
    be = backend()
    serialize = be._serialize

    def tampered(tracer: Any) -> bytes:
        # Point the model call at a submodule's envoy instead of the model.
        tracer.fn = types.MethodType(TransformersModel._call, client.lm_head)
        return serialize(tracer)

    be._serialize = tampered
    with pytest.raises(SandboxError, match="something other than the model"):
        save_logits(client, be)


def test_allowlist_is_what_real_payloads_use(models: tuple[Any, Any], sandbox: Any) -> None:
    """Every global the legit corpus's payloads reference is allowlisted, and nothing more is needed."""
    from sandbox.harness import SandboxBackend

    client, server = models
    used: set[tuple[str, str]] = set()
    original = SandboxUnpickler.find_class

    def recording(self: SandboxUnpickler, module: str, name: str) -> Any:
        used.add((module, name))
        return original(self, module, name)

    SandboxUnpickler.find_class = recording  # type: ignore[method-assign]
    try:
        for program in PROGRAMS[:4] + PROGRAMS[10:13]:
            program(client, SandboxBackend(client, server, sandbox))
    finally:
        SandboxUnpickler.find_class = original  # type: ignore[method-assign]
    assert used <= ALLOWED_GLOBALS | SUBSTITUTED_GLOBALS
    assert ("torch.storage", "_load_from_bytes") in used  # a captured tensor went the safe way


def test_works_as_the_unpickler_hook_of_request_deserialize(models: tuple[Any, Any], backend: Any) -> None:
    """`RequestModel.deserialize(..., unpickler=SandboxUnpickler.bind(guards))` loads real payloads
    and refuses crafted ones (it still compiles the body with the stock compiler: the executor
    compiles restricted itself)."""
    from model_runtime.sandbox.capabilities import Capabilities
    from model_runtime.sandbox.guards import Guards

    client, server = models
    be = backend()
    save_logits(client, be)
    assert be.blob is not None
    hook = SandboxUnpickler.bind(Guards(Capabilities(), lambda _v: False))
    persistent = server._remoteable_persistent_objects()
    import linecache

    saved = dict(linecache.cache)  # deserialize registers the block under the client's file name
    try:
        tracer = RequestModel.deserialize(be.blob, persistent, compress=True, unpickler=hook)
    finally:
        linecache.cache.clear()
        linecache.cache.update(saved)
    assert tracer.envoy._module is server._module
    with pytest.raises(PayloadRejected):
        RequestModel.deserialize(CRAFTED["os_system_reduce"], persistent, unpickler=hook)


def test_mutated_real_payloads_never_change_the_server(models: tuple[Any, Any], backend: Any) -> None:
    """Random byte edits of a real payload: each load is refused or builds only fresh objects; the
    server's modules, weights and allowlisted globals are untouched either way."""
    import random

    from model_runtime.sandbox.capabilities import Capabilities
    from model_runtime.sandbox.guards import Guards
    from model_runtime.sandbox.limits import address_space_cap

    client, server = models
    be = backend()
    save_logits(client, be)
    assert be.blob is not None
    raw = zstandard.ZstdDecompressor().decompress(be.blob)
    persistent = server._remoteable_persistent_objects()
    guards = Guards(Capabilities(), lambda _v: False)
    structure = [(name, type(m)) for name, m in server._module.named_modules()]
    before, globals_before = weights_digest(server), _server_state(server)
    rng = random.Random(6)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(300):
        data = bytearray(raw)
        for _edit in range(rng.randint(1, 3)):
            data[rng.randrange(2, len(data))] = rng.randrange(256)
        try:
            # Under the request's memory cap, as in production: an edited size would otherwise
            # allocate tens of GB on the test machine.
            with address_space_cap(1024**3):
                SandboxUnpickler(io.BytesIO(bytes(data)), persistent, guards).load()
            outcomes["loaded"] += 1
        except Exception:  # any refusal or malformed-stream error is fine here
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and outcomes["loaded"] > 0, outcomes  # both passes really ran
    assert weights_digest(server) == before
    assert _server_state(server) == globals_before
    assert [(name, type(m)) for name, m in server._module.named_modules()] == structure


def test_every_crafted_blob_names_its_refusal() -> None:
    assert set(REFUSED_BY) == set(CRAFTED)


class _Ref:
    def __init__(self, pid: Any) -> None:
        self.pid = pid


class _RefPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if isinstance(obj, _Ref) else None


def _with_pids(*pids: Any) -> bytes:
    buffer = io.BytesIO()
    _RefPickler(buffer, protocol=4).dump([_Ref(pid) for pid in pids])
    return buffer.getvalue()


@pytest.mark.parametrize("pid", ["Module:evil", 1, b"Module:model", ("Module:model",), ["Module:model"]],
                         ids=repr)
def test_the_dry_run_refuses_every_persistent_id_the_server_has_not(pid: Any) -> None:
    """The dry run's persistent ids are a C dict lookup: exactly the server's `str` ids resolve;
    anything else (another name, another type, an unhashable value) stops the load."""
    from model_runtime.sandbox.unpickling import _DryRun

    persistent = {"Module:model": object(), "Module:model.lm_head": object()}
    with pytest.raises(Exception) as refused:
        _DryRun(_with_pids("Module:model", pid), persistent).load()
    assert type(refused.value).__name__ in ("UnknownPersistentIdError", "TypeError")


def test_the_dry_run_stands_one_object_for_each_server_id() -> None:
    from model_runtime.sandbox.unpickling import _DryRun, _ServerObject

    persistent = {"Module:model": object(), "Module:model.lm_head": object()}
    data = _with_pids("Module:model", "Module:model.lm_head", "Module:model")
    first, second = _DryRun(data, persistent).load(), _DryRun(data, dict(persistent)).load()
    assert all(isinstance(item, _ServerObject) for item in first)
    assert first[0] is first[2] and first[0] is not first[1]  # as identity is in the real load
    assert first == second  # shared between loads: nothing in a stand-in can change
    assert [item.what for item in first] == [f"the server's {pid}" for pid in
                                             ("Module:model", "Module:model.lm_head", "Module:model")]
    other = _DryRun(_with_pids("Module:model"), {"Module:model": object()}).load()
    assert other[0] is not first[0]  # another set of ids, its own stand-ins


def test_dry_run_class_stand_ins_make_instances_in_c_and_refuse_class_writes() -> None:
    """NEWOBJ on a class stand-in runs no Python (C-level `object.__new__`, arguments accepted);
    its instances keep their kind's BUILD rule; BUILD on the class itself and calling a class that
    is not reducible are refused."""
    from model_runtime.sandbox.unpickling import _ENVOY_KINDS, _stand_in_for

    envoy = _stand_in_for(("nnsight.intervention.envoy", "Envoy"))
    assert envoy.__new__ is object.__new__
    made = envoy.__new__(envoy, "ignored")
    assert type(made) in _ENVOY_KINDS
    made.__setstate__({"_children": []})  # a fresh envoy's state: accepted
    with pytest.raises(PayloadRejected):
        made.__setstate__({"_children": [object()]})  # children it did not create
    with pytest.raises(PayloadRejected):
        envoy.__setstate__  # noqa: B018 - BUILD on the class looks this up
    with pytest.raises(PayloadRejected):
        envoy()  # REDUCE: not a reducible global
    size = _stand_in_for(("torch", "Size"))  # reducible, not buildable
    with pytest.raises(PayloadRejected):
        size().__setstate__({})
    ordered = _stand_in_for(("collections", "OrderedDict"))
    ordered()["key"] = "value"  # reducible: calling it makes a fresh mapping, SETITEM accepted
