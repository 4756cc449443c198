"""Sandbox classes beyond the generic attack corpus: request source names (class 1), bounded
outputs (class 7), batch/sequence limits, and the server-state snapshot (class 2)."""

from __future__ import annotations

import linecache
import operator
from typing import Any

import nnsight
import pytest
import torch
import transformers.models.llama.modeling_llama as modeling_llama
from nnsight.tracing import util as nnsight_util

import model_runtime.sandbox.compiling as compiling
from model_runtime.sandbox import LimitExceeded, Limits, RequestFailed
from model_runtime.sandbox.provenance import ServerState
from sandbox.attacks import source_names
from sandbox.harness import SandboxBackend, weights_digest
from sandbox.test_legit import assert_same

SERVER_FILES = [modeling_llama.__file__, nnsight_util.__file__, compiling.__file__, "<string>", "/etc/passwd"]


class ChosenFilenameBackend(SandboxBackend):
    """A modified client: the request's frame claims any file name the attacker likes."""

    filename = ""

    def _serialize(self, tracer: Any) -> bytes:
        original = nnsight_util.SerializedFrame.of

        def of(frame: Any) -> Any:
            return nnsight_util.SerializedFrame(self.filename, 1, "forward")

        nnsight_util.SerializedFrame.of = of  # type: ignore[method-assign]
        try:
            return super()._serialize(tracer)
        finally:
            nnsight_util.SerializedFrame.of = original  # type: ignore[method-assign]


@pytest.mark.parametrize("filename", SERVER_FILES)
@pytest.mark.parametrize("program", source_names.PROGRAMS, ids=lambda p: p.__name__)
def test_client_file_name_is_never_used_for_source(program: Any, filename: str, models: tuple[Any, Any],
                                                   local_model: Any, sandbox: Any) -> None:
    client, server = models
    before = {name: list(linecache.getlines(name)) for name in SERVER_FILES}
    digest = weights_digest(server)
    torch.manual_seed(0)
    local = program(local_model, None)
    backend = ChosenFilenameBackend(client, server, sandbox)
    backend.filename = filename
    torch.manual_seed(0)
    remote = program(client, backend)
    assert_same(local, remote)
    assert {name: list(linecache.getlines(name)) for name in SERVER_FILES} == before
    assert weights_digest(server) == digest


def test_traceback_never_reads_the_claimed_file(models: tuple[Any, Any], sandbox: Any) -> None:
    client, server = models
    backend = ChosenFilenameBackend(client, server, sandbox)
    backend.filename = "/etc/passwd"
    with pytest.raises(RequestFailed) as info:
        with client.trace("hello", backend=backend):
            client.lm_head.output.save()
            raise ValueError("mine")
    text = str(info.value)
    assert 'File "/etc/passwd", line' in text and "root:" not in text
    assert "ValueError: mine" in text


# -- class 7: outputs are bounded ----------------------------------------------------------------


def test_huge_error_texts_are_bounded(models: tuple[Any, Any], backend: Any) -> None:
    client, _ = models
    with pytest.raises(RequestFailed) as info:
        with client.trace("hello", backend=backend()):
            name = "a" * 20_000_000
            x = getattr(client.lm_head.output, name)  # noqa: F841
    assert len(str(info.value)) < 20_000
    with pytest.raises(RequestFailed) as info:
        with client.trace("hello", backend=backend()):
            client.lm_head.output.save()
            raise ValueError("b" * 50_000_000)
    assert len(str(info.value)) < 20_000


def test_huge_key_and_private_name_errors_are_bounded(models: tuple[Any, Any], backend: Any) -> None:
    from model_runtime.sandbox import SandboxError

    client, _ = models
    with pytest.raises(RequestFailed) as info:
        with client.trace("hello", backend=backend()):
            table = {}
            client.lm_head.output.save()
            value = table["k" * 30_000_000]  # noqa: F841
    assert len(str(info.value)) < 20_000
    with pytest.raises(SandboxError) as refused:
        with client.trace("hello", backend=backend()):
            x = getattr(client.lm_head, "_" + "p" * 30_000_000)  # noqa: F841
    assert len(str(refused.value)) < 5_000


def test_one_huge_log_line_is_bounded(models: tuple[Any, Any], backend: Any) -> None:
    client, _ = models
    be = backend()
    with client.trace("hello", backend=be):
        print("y" * 20_000_000)
        out = client.lm_head.output.save()  # noqa: F841
    assert be.logs and max(len(line) for line in be.logs) <= 17_000


def test_print_flood_is_bounded(models: tuple[Any, Any], backend: Any) -> None:
    client, _ = models
    be = backend()
    with client.trace("hello", backend=be):
        for _ in range(3000):
            print("x" * 1000)
        out = client.lm_head.output.save()  # noqa: F841
    assert sum(len(line) for line in be.logs) <= 1_100_000


# -- batch and sequence limits (the ModelDeployment's maxBatchSize / maxSequenceLength) ---------


def test_batch_and_sequence_limits(models: tuple[Any, Any], backend: Any) -> None:
    client, _ = models
    small = Limits(timeout_s=10.0, max_batch_size=1, max_sequence_length=6)
    with pytest.raises(LimitExceeded, match="maxBatchSize"):
        with client.trace(["one", "two"], backend=backend(limits=small)):
            client.lm_head.output.save()
    with pytest.raises(LimitExceeded, match="maxSequenceLength"):
        with client.trace("a rather long prompt that has more than six tokens", backend=backend(limits=small)):
            client.lm_head.output.save()
    with pytest.raises(LimitExceeded, match="maxSequenceLength"):
        with client.generate("four tokens", max_new_tokens=8, backend=backend(limits=small)) as tracer:
            tracer.result.save()
    with client.trace("short", backend=backend(limits=small)):
        ok = client.lm_head.output.save()
    assert ok.shape[0] == 1


# -- attention: the budget is sized for the attention the replica loaded -----------------------------


def test_a_switch_to_eager_attention_is_refused_early(models: tuple[Any, Any], backend: Any) -> None:
    client, server = models
    assert server._module.config._attn_implementation == "sdpa"
    be = backend()
    be.env = {**be.env, "attn_implementation": "eager"}  # what a client loaded with attn_implementation="eager" sends
    with pytest.raises(LimitExceeded, match="budget") as info:
        with client.trace("Hello", backend=be):
            client.lm_head.output.save()
    assert "'eager'" in str(info.value) and "attn_implementation" in str(info.value)
    assert server._module.config._attn_implementation == "sdpa", "the refused request switched the model"
    with pytest.raises(LimitExceeded, match="output_attentions=True needs eager attention"):
        with client.trace("Hello", output_attentions=True, backend=backend()):
            client.lm_head.output.save()
    with pytest.raises(LimitExceeded, match="output_attentions"):
        with client.generate("Hello", max_new_tokens=2, output_attentions=True, backend=backend()) as tracer:
            tracer.result.save()
    with pytest.raises(Exception, match="read-only"):  # the config is server state
        with client.trace("Hello", backend=backend()):
            client.config.output_attentions = True
            client.lm_head.output.save()
    with pytest.raises(Exception, match="attn_implementation"):  # a loader keyword in the model call
        with client.trace("Hello", attn_implementation="eager", backend=backend()):
            client.lm_head.output.save()
    assert server._module.config._attn_implementation == "sdpa" and not server._module.config.output_attentions
    with client.trace("Hello", backend=backend()):  # the next request runs as before
        ok = client.lm_head.output.save()
    assert ok.shape[0] == 1


def test_output_attentions_runs_on_an_eager_model_while_the_budget_holds_it(tmp_path: Any) -> None:
    from transformers import AutoModelForCausalLM

    from model_runtime.sandbox.model_calls import shape_limits
    from model_runtime.tiny_models import build_tiny_model

    build_tiny_model("llama", tmp_path, config_overrides={"num_hidden_layers": 4})
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.ones((1, 8), dtype=torch.long)
    with shape_limits(eager, max_batch_size=1, max_sequence_length=64), torch.no_grad():
        out = eager(input_ids=ids, output_attentions=True)  # 4 layers of 8^2 fit one layer's 64^2 allowance
    assert len(out.attentions) == 4
    with shape_limits(eager, max_batch_size=1, max_sequence_length=8), torch.no_grad():
        eager(input_ids=ids)  # one layer's scores at a time: what the budget holds
        with pytest.raises(LimitExceeded, match="keeps every layer's attention weights"):
            eager(input_ids=ids, output_attentions=True)  # 4 layers x 8^2 x 4 bytes > 8^2 x (4 + 4)


def test_limits_defaults_are_the_model_deployments() -> None:
    from ndif_operator.api import ModelUserConfig, RuntimeLimits

    config = ModelUserConfig.from_limits(RuntimeLimits(), ModelUserConfig().level)
    assert Limits.from_config(config) == Limits()
    custom = RuntimeLimits(max_payload_bytes=128 * 1024 * 1024, max_batch_size=2, request_timeout_seconds=9)
    limits = Limits.from_config(ModelUserConfig.from_limits(custom, ModelUserConfig().level))
    assert (limits.max_payload_bytes, limits.max_batch_size, limits.timeout_s) == (128 * 1024 * 1024, 2, 9.0)


# -- class 2: the server-state snapshot -----------------------------------------------------------


def test_server_state_is_restored_after_a_change_behind_the_guards(models: tuple[Any, Any]) -> None:
    _, server = models
    state = ServerState(server)
    server._module.all_tied_weights_keys["planted"] = print
    server.model.layers[0]._edits.append("planted")
    changed = state.verify_and_restore()
    assert "planted" not in server._module.all_tied_weights_keys
    assert server.model.layers[0]._edits == []
    assert any("all_tied_weights_keys" in c for c in changed) and any("_edits" in c for c in changed)
    assert state.verify_and_restore() == []
    assert nnsight  # the module the programs use


class _Envoy:
    """The shape `ServerState` reads: an envoy tree over a module, with state containers."""

    def __init__(self) -> None:
        from collections import OrderedDict

        self.path = "model"
        self._children: list[Any] = []
        self._module = torch.nn.Linear(2, 2)
        self.items = [1, "a", None]
        self.table = {"x": 1, "y": [2]}
        self.tags = {"p", "q"}
        self.ordered = OrderedDict(a=1, b=2)
        self.empty_list: list[Any] = []
        self.empty_dict: dict[str, Any] = {}
        self.more = [object(), object()]


def _change_each_kind(e: _Envoy) -> None:
    e.items[1] = "b"  # same length, another item
    e.table["y"] = [2]  # an equal value, not the same object
    e.tags.discard("p")
    e.tags.add("r")
    e.ordered.move_to_end("a")
    e.empty_list.append(print)
    e.empty_dict["k"] = print
    e.more.reverse()


def _rename_first_key(e: _Envoy) -> None:
    values = list(e.table.values())  # the same values, in the same order, under another first key
    e.table.clear()
    e.table.update(zip(["renamed", "y"], values, strict=True))


def test_server_state_snapshot_sees_and_restores_each_container_kind() -> None:
    """The snapshot is flattened (one list for every list's items, one for every dict's keys and
    values): a change in any container of any kind is seen, and each is put back to its own
    contents, whatever changed in the others."""
    envoy = _Envoy()
    state = ServerState(envoy)
    before = {k: (list(v.items()) if isinstance(v, dict) else set(v) if isinstance(v, set) else list(v))
              for k, v in vars(envoy).items() if k in ("items", "table", "tags", "ordered", "empty_list",
                                                      "empty_dict", "more")}
    values = {k: list(v.values()) if isinstance(v, dict) else None for k, v in vars(envoy).items()}
    _change_each_kind(envoy)
    changed = state.verify_and_restore()
    assert sorted(changed) == sorted(f"envoy model.{k}" for k in before)
    for key, contents in before.items():
        now = getattr(envoy, key)
        assert (list(now.items()) if isinstance(now, dict) else set(now) if isinstance(now, set)
                else list(now)) == contents, key
        if isinstance(now, dict):
            assert all(map(operator.is_, now.values(), values[key] or [])), key
    assert state.verify_and_restore() == []
    one_at_a_time = [
        lambda e: e.items.__setitem__(1, "b"), lambda e: e.table.__setitem__("y", [2]),
        _rename_first_key, lambda e: e.tags.symmetric_difference_update({"p", "r"}),
        lambda e: e.ordered.move_to_end("a"), lambda e: e.more.reverse(), lambda e: e.items.append(4),
        lambda e: e.table.pop("x"), lambda e: e.more.clear(), lambda e: e.empty_dict.update(k=print),
    ]
    for change in one_at_a_time:
        state.capture()
        change(envoy)
        assert len(state.verify_and_restore()) == 1, "each change alone is seen"
        assert state.verify_and_restore() == []



def test_server_state_compares_a_plain_dict_only_once_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain dict is read only when its version tag moved: written back as it was, it is compared,
    found intact and its tag recorded again; changed, it is put back; and without a trustworthy
    tag every dict is compared."""
    from model_runtime.sandbox import dict_versions, provenance

    assert dict_versions.dict_version is not None  # (so the version-tag path is what is tested)
    envoy = _Envoy()
    state = ServerState(envoy)
    recorded = state._dict_versions
    envoy.table["z"] = print
    del envoy.table["z"]
    assert state.verify_and_restore() == [] and state._dict_versions != recorded
    envoy.table["x"] = 2
    assert state.verify_and_restore() == ["envoy model.table"] and envoy.table["x"] == 1
    monkeypatch.setattr(provenance, "versions", lambda _dicts: None)
    state.capture()
    envoy.table["x"] = 3
    assert state.verify_and_restore() == ["envoy model.table"] and envoy.table["x"] == 1


def test_server_state_follows_containers_the_server_fills_or_empties_between_requests() -> None:
    """A capture after the server filled an empty container or emptied a filled one snapshots
    the new contents: a request's change to either is then seen and undone to them."""
    envoy = _Envoy()
    state = ServerState(envoy)
    envoy.empty_list.append("server's")  # between requests: the server's own change
    envoy.more.clear()
    state.capture()
    assert state.verify_and_restore() == []
    envoy.empty_list.append(print)  # the request's
    envoy.more.append(print)
    assert sorted(state.verify_and_restore()) == ["envoy model.empty_list", "envoy model.more"]
    assert envoy.empty_list == ["server's"] and envoy.more == []
    assert state.verify_and_restore() == []


def test_server_state_is_what_every_request_starts_from() -> None:
    """`begin` keeps the snapshot a finished verification left (no read per request): a change
    made between two requests is undone when the next one ends; a container adopted since is
    snapshotted at the next start."""
    envoy = _Envoy()
    state = ServerState(envoy)
    assert state.verify_and_restore() == []
    envoy.items.append(print)  # between requests (a finaliser run at collection)
    state.begin()
    assert state.verify_and_restore() == ["envoy model.items"]
    assert envoy.items == [1, "a", None]
    adopted: list[Any] = ["server's"]
    state.adopt(adopted, "adopted table")
    state.begin()
    adopted.append(print)
    assert state.verify_and_restore() == ["adopted table"] and adopted == ["server's"]


def test_edit_is_refused_with_what_to_do_instead(models: tuple[Any, Any], backend: Any) -> None:
    from model_runtime.sandbox import SandboxError

    client, _ = models
    with client.edit() as (_tracer, edited):
        client.model.layers[0].mlp.output[:] = 0
    with pytest.raises(SandboxError, match=r"put the intervention in each trace"):
        with edited.trace("hello", backend=backend()):
            edited.lm_head.output.save()
    with pytest.raises(SandboxError, match=r"assign the intervention in the trace body"):
        with client.trace("hello", backend=backend()):
            with client.edit() as (tracer, inner):  # noqa: RUF059
                pass
            client.lm_head.output.save()
