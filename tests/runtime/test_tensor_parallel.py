"""Tensor parallelism end to end: real Ray Serve, the real gateway, the unmodified nnsight client,
two ranks over gloo on CPU, for two architectures (Llama: transformers' own plan; GPT-NeoX).

Every TP=2 result is compared with the same checkpoint at TP=1 (max abs diff <= 1e-5, tokens
identical). The replica is deployed as the renderer renders it: a STRICT_PACK placement group of
two bundles, the replica (rank 0) in bundle 0 and its shard actor in bundle 1.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError
from parallel.checkpoint_split import checkpoint_split

from model_runtime.tiny_models import build_tiny_model
from runtime.conftest import gateway_target, model_args, model_target, route
from runtime.wire import poll_backend

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPT = "The Eiffel Tower is in the city of"
TP_PREFIX = "/tp"
ARCHS = ("llama", "gpt-neox")
TOLERANCE = 1e-5
# What the renderer emits for a CPU-only TP=2 replica with replica_num_cpus 0.
TP_BUNDLES = [{"CPU": 0.01}, {"CPU": 0.01}]


def _app(arch: str) -> str:
    return f"md-tp-{arch}"


@pytest.fixture(scope="module")
def tp_served(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from ray import serve

    root = tmp_path_factory.mktemp("tp-models")
    paths = {arch: build_tiny_model(arch, root / f"tiny-{arch}") for arch in ARCHS}  # type: ignore[arg-type]
    targets = [
        model_target(_app(arch), {**model_args(path, f"default/tp-{arch}"), "tensor_parallel_size": 2},
                     placement_group_bundles=TP_BUNDLES, placement_group_strategy="STRICT_PACK",
                     health_check_period_s=1, health_check_timeout_s=30)
        for arch, path in paths.items()
    ]
    routes = {str(path).lower(): route(_app(arch), deployment=f"default/tp-{arch}", repo_id=str(path))
              for arch, path in paths.items()}
    targets.append(gateway_target(routes=routes, app_name="gateway-tp", route_prefix=TP_PREFIX))
    serve.run_many(targets)
    # Client and TP=1 models, built once per architecture for the module (a trace never changes
    # either: edits last one trace; the served weights are the digest tests' business).
    return {"url": f"http://127.0.0.1:{serve_port}{TP_PREFIX}", "paths": paths, "clients": {}, "locals": {}}


def _client(tp_served: dict[str, Any], arch: str) -> Any:
    from nnsight import TransformersModel
    from nnsight.modeling.huggingface import _ID_CACHE

    if arch not in tp_served["clients"]:
        path = str(tp_served["paths"][arch])
        _ID_CACHE[path] = path
        tp_served["clients"][arch] = TransformersModel(path, task="text-generation")
    return tp_served["clients"][arch]


def _local(tp_served: dict[str, Any], arch: str) -> Any:
    """The same checkpoint at TP=1, loaded the way a single-device replica loads it."""
    from nnsight import TransformersModel

    if arch not in tp_served["locals"]:
        tp_served["locals"][arch] = TransformersModel(str(tp_served["paths"][arch]), task="text-generation",
                                                      dispatch=True, device_map="cpu", dtype="float32")
    return tp_served["locals"][arch]


def _backend(model: Any, url: str, blocking: bool = True) -> RemoteBackend:
    return RemoteBackend(model.to_model_key(), host=url, env=model._remoteable_get_env(), blocking=blocking)


def layers_of(model: Any) -> Any:
    return model.gpt_neox.layers if hasattr(model, "gpt_neox") else model.model.layers


def head_of(model: Any) -> Any:
    return model.embed_out if hasattr(model, "embed_out") else model.lm_head


def _every_layer_and_logits(model: Any, backend: Any) -> dict[str, torch.Tensor]:
    with model.trace(PROMPT, backend=backend):
        first = layers_of(model)[0].output.save()
        last = layers_of(model)[-1].output.save()
        logits = head_of(model).output.save()
    return {"first": first, "last": last, "logits": logits}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def _serves_the_next_request_as_tp1(client: Any, local: Any, url: str, failure: str, wait_s: float = 240) -> None:
    """After a failure, requests are retried until one succeeds (within `wait_s`); its logits equal TP=1's."""
    with local.trace(PROMPT):
        reference = head_of(local).output.save()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with client.trace(PROMPT, backend=_backend(client, url)):
                logits = head_of(client).output.save()
            break
        except RemoteError:
            assert time.monotonic() < deadline, failure
            time.sleep(2)
    assert _max_diff(logits, reference) <= TOLERANCE


def _remote_equals_tp1(tp_served: dict[str, Any], arch: str, program: Any) -> tuple[Any, Any, str]:
    """`program(model, backend)` through the gateway (TP=2) equals it at TP=1: plain tensors, each
    within TOLERANCE. Returns (client, local model, url) for further checks."""
    client, local, url = _client(tp_served, arch), _local(tp_served, arch), tp_served["url"]
    remote = program(client, _backend(client, url))
    reference = program(local, None)
    for name in reference:
        assert type(remote[name]) is torch.Tensor, name
        assert _max_diff(remote[name], reference[name]) <= TOLERANCE, name
    return client, local, url


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_equals_tp1_logits_hidden_states_and_tokens(tp_served: dict[str, Any], arch: str) -> None:
    client, local, url = _remote_equals_tp1(tp_served, arch, _every_layer_and_logits)
    # Every layer, one save each (a whole tensor: gathered from both ranks).
    n_layers = len(layers_of(local))
    for i in range(n_layers):
        with client.trace(PROMPT, backend=_backend(client, url)):
            hidden = layers_of(client)[i].output.save()
        with local.trace(PROMPT):
            ref = layers_of(local)[i].output.save()
        assert _max_diff(hidden, ref) <= TOLERANCE, f"layer {i}"
    # Generated tokens are identical.
    with client.generate(PROMPT, max_new_tokens=6, do_sample=False, backend=_backend(client, url)) as tracer:
        tokens = tracer.result.save()
    with local.generate(PROMPT, max_new_tokens=6, do_sample=False) as tracer:
        ref_tokens = tracer.result.save()
    assert torch.equal(tokens, ref_tokens)


def embed_of(model: Any) -> Any:
    return model.gpt_neox.embed_in if hasattr(model, "gpt_neox") else model.model.embed_tokens


def _embedding_read_and_edit(model: Any, backend: Any) -> dict[str, torch.Tensor]:
    with model.trace(PROMPT, backend=backend):
        ids = embed_of(model).input.save()
        embedded = embed_of(model).output.save()
        embed_of(model).output[:, 1] = 0.0
        logits = head_of(model).output.save()
    return {"ids": ids, "embedded": embedded, "logits": logits}


@pytest.mark.parametrize("arch", ARCHS)
def test_embedding_input_output_and_edit_equal_tp1(tp_served: dict[str, Any], arch: str) -> None:
    """Llama's embed_tokens is split by vocabulary rows on TP (transformers adds it to the plan)."""
    _remote_equals_tp1(tp_served, arch, _embedding_read_and_edit)


# --- each rank reads only its shard -------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_each_rank_reads_only_its_shard(tp_served: dict[str, Any], arch: str) -> None:
    from ray import serve

    info = serve.get_app_handle(_app(arch)).info.remote().result()
    by_rank = info["bytes_read_by_rank"]
    sharded, replicated = checkpoint_split(tp_served["paths"][arch])
    assert sharded > replicated  # the test means something: most bytes are in sharded tensors
    bound = sharded / 2 + replicated
    assert sorted(by_rank) == [0, 1]
    for rank, read in by_rank.items():
        assert read <= bound * 1.05, (rank, read, bound)
        assert read >= sharded / 2, (rank, read, sharded)  # counted for real: at least its share


# --- levels on every rank -----------------------------------------------------------------------


def test_levels_move_every_rank(tp_served: dict[str, Any]) -> None:
    from ray import serve

    handle = serve.get_app_handle(_app("llama"))
    client, local, url = _client(tp_served, "llama"), _local(tp_served, "llama"), tp_served["url"]
    reference = _every_layer_and_logits(local, None)["logits"]
    assert handle.set_level.remote("Warm").result()["to_level"] == "Warm"
    with pytest.raises(RemoteError, match="WARM"):
        _every_layer_and_logits(client, _backend(client, url))
    assert handle.set_level.remote("Hot").result()["source"] == "memory"
    assert _max_diff(_every_layer_and_logits(client, _backend(client, url))["logits"], reference) <= TOLERANCE
    handle.set_level.remote("Cold").result()
    assert handle.set_level.remote("Hot").result()["source"] == "localPath"  # every rank re-read its shard
    assert _max_diff(_every_layer_and_logits(client, _backend(client, url))["logits"], reference) <= TOLERANCE
    assert handle.info.remote().result()["level"] == "Hot"


# --- the sandbox's programs on TP ---------------------------------------------------------------


def _close(local: Any, remote: Any, path: str = "") -> None:
    if isinstance(local, torch.Tensor):
        assert isinstance(remote, torch.Tensor), path
        if local.is_floating_point():
            # 1e-5 absolute, plus 1e-6 relative for large values (gradients reach ~30: the ranks
            # sum in another order).
            assert torch.allclose(local, remote, atol=TOLERANCE, rtol=1e-6), (path, _max_diff(local, remote))
        else:
            assert torch.equal(local, remote), path
    elif isinstance(local, dict):
        assert set(local) == set(remote), path
        for key in local:
            _close(local[key], remote[key], f"{path}.{key}")
    elif isinstance(local, (list, tuple)):
        assert len(local) == len(remote), path
        for i, (a, b) in enumerate(zip(local, remote, strict=True)):
            _close(a, b, f"{path}[{i}]")
    else:
        assert local == remote, path


def _legit_programs() -> list[Any]:
    from sandbox.legit_programs import PROGRAMS

    return list(PROGRAMS)  # read_weights included: a weight read in a trace is whole on TP too


@pytest.mark.parametrize("program", _legit_programs(), ids=lambda p: getattr(p, "__name__", str(p)))
def test_legit_program_on_tp_equals_tp1(tp_served: dict[str, Any], program: Any) -> None:
    client, local, url = _client(tp_served, "llama"), _local(tp_served, "llama"), tp_served["url"]
    torch.manual_seed(0)
    reference = program(local, None)
    torch.manual_seed(0)
    _close(reference, program(client, _backend(client, url)))


def _attacks() -> list[Any]:
    from sandbox.attacks import capabilities, escapes, tampering

    return escapes.ATTACKS + capabilities.ATTACKS + tampering.ATTACKS


@pytest.fixture(scope="module")
def digests_before(tp_served: dict[str, Any]) -> list[str]:
    from ray import serve

    return serve.get_app_handle(_app("llama")).weight_digests.remote().result()


@pytest.mark.parametrize("attack", _attacks(), ids=lambda a: f"{a.__module__.rsplit('.', 1)[-1]}.{a.__name__}")
def test_attack_is_refused_on_tp_and_every_rank_keeps_its_weights(
    tp_served: dict[str, Any], attack: Any, digests_before: list[str]
) -> None:
    from ray import serve
    from sandbox.harness import SECRET

    client, url = _client(tp_served, "llama"), tp_served["url"]
    with pytest.raises(RemoteError) as info:
        attack(client, _backend(client, url))
    assert str(info.value).strip() and SECRET not in str(info.value)
    digests = serve.get_app_handle(_app("llama")).weight_digests.remote().result()
    assert len(digests) == 2 and digests == digests_before, "a rank's weights changed"


# --- a dead rank ---------------------------------------------------------------------------------


def _job_status(url: str, job_id: str) -> str:
    import httpx

    response = httpx.get(f"{url}/response/{job_id}", timeout=10)
    return str(response.json().get("status", "")) if response.status_code == 200 else ""


def test_rank_killed_mid_request_gives_error_and_replica_is_replaced(tp_served: dict[str, Any]) -> None:
    import ray

    arch, url = "gpt-neox", tp_served["url"]
    client, local = _client(tp_served, arch), _local(tp_served, arch)
    backend = _backend(client, url, blocking=False)
    with client.generate(PROMPT, max_new_tokens=110, do_sample=False, backend=backend) as tracer:
        tokens = tracer.result.save()  # noqa: F841 (the job fails)
    deadline = time.monotonic() + 60
    while _job_status(url, backend.job_id) != "RUNNING":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.02)
    prefix = f"ndif-tp-{_app(arch)}-"
    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    assert len(named) == 1, named  # rank 1 of the one replica
    ray.kill(ray.get_actor(named[0]["name"], namespace=named[0]["namespace"]))
    deadline = time.monotonic() + 120
    while (status := _job_status(url, backend.job_id)) not in ("ERROR", "COMPLETED"):
        assert time.monotonic() < deadline, "the job never ended"
        time.sleep(0.1)
    assert status == "ERROR"
    with pytest.raises(RemoteError, match="tensor-parallel rank"):
        poll_backend(backend, timeout=10)
    # Serve replaces the unhealthy replica (with a new rank 1); the next request succeeds.
    _serves_the_next_request_as_tp1(client, local, url, "the replica was not replaced")
    renamed = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    assert len(renamed) == 1 and renamed[0]["name"] != named[0]["name"]  # the old rank is not orphaned


# --- stops: a timeout or a user exception ends the request on every rank; the replica stays ----


TIGHT = {"request_timeout_seconds": 2, "max_result_bytes": 4 * 1024**2}


def _rank_actors(arch: str) -> list[tuple[str, str]]:
    """(name, actor id) of the app's shard actors: the same pairs mean the same replica and ranks."""
    import ray

    prefix = f"ndif-tp-{_app(arch)}-"
    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return sorted((a["name"], ray.get_actor(a["name"], namespace=a["namespace"])._actor_id.hex()) for a in named)


def _stopped_then_served(tp_served: dict[str, Any], arch: str, program: Any, match: str,
                         config: dict[str, Any] = TIGHT) -> int:
    """Run `program` under `config` (it must fail with `match`), then one normal request on the
    same replica and ranks, equal to TP=1; returns the process-group rebuild count."""
    from ray import serve

    handle = serve.get_app_handle(_app(arch))
    client, local, url = _client(tp_served, arch), _local(tp_served, arch), tp_served["url"]
    ranks_before = _rank_actors(arch)
    assert len(ranks_before) == 1
    handle.reconfigure.remote(config).result()
    try:
        with pytest.raises(RemoteError, match=match):
            program(client, _backend(client, url))
    finally:
        handle.reconfigure.remote({}).result()
    with local.trace(PROMPT):
        reference = head_of(local).output.save()
    with client.trace(PROMPT, backend=_backend(client, url)):
        logits = head_of(client).output.save()
    assert _max_diff(logits, reference) <= TOLERANCE
    assert _rank_actors(arch) == ranks_before, "the replica or its ranks were replaced"
    info = handle.info.remote().result()
    assert info["level"] == "Hot" and not info["wedged"]
    handle.check_health.remote().result()  # healthy: Serve keeps it
    return int(info["tp_group_rebuilds"])


def _resource_attacks() -> list[Any]:
    """The sandbox's resource attacks, less `memory_bomb_tensor`: through Serve the memory cap is
    the sandbox's default 8 GiB, which its 8 GiB tensor fits; filling it is one native call that
    outlasts the 2 s timeout and that no stop interrupts, on one device as on TP (the replica is
    then replaced as wedged). tests/sandbox runs it under a 2 GiB cap. It would also put 8 GiB
    per rank on the test machine."""
    from sandbox.attacks import resources

    return [a for a in resources.ATTACKS if a is not resources.memory_bomb_tensor]


@pytest.mark.parametrize("attack", _resource_attacks(), ids=lambda a: a.__name__)
def test_resource_attack_on_tp_keeps_the_replica(tp_served: dict[str, Any], attack: Any) -> None:
    from sandbox.harness import SECRET

    def program(client: Any, backend: Any) -> None:
        try:
            attack(client, backend)
        except RemoteError as exc:
            assert SECRET not in str(exc)
            raise

    _stopped_then_served(tp_served, "llama", program, r"\S")


def _long_generate(client: Any, backend: Any) -> None:
    """A generate whose every step gathers the hidden states: collectives all the way through
    (`min_new_tokens`: a random tiny model may otherwise emit its end token early)."""
    with client.generate(PROMPT, max_new_tokens=400, min_new_tokens=400, do_sample=False,
                         backend=backend) as tracer:
        hidden = list().save()
        with tracer.iter[:]:
            hidden.append(layers_of(client)[0].output)


@pytest.mark.parametrize("arch", ARCHS)
def test_timeout_mid_forward_ends_the_request_and_the_model_serves_again(tp_served: dict[str, Any],
                                                                          arch: str) -> None:
    """A stop in the middle of the forward: on the same ranks when no rank was left blocked in a
    collective (the group is rebuilt), else on a new replica (one blocked in native code cannot
    be stopped; docs/runtime.md). Either way the user gets the timeout and the next request is
    served, and the app keeps exactly one set of ranks."""
    from ray import serve

    handle = serve.get_app_handle(_app(arch))
    client, local, url = _client(tp_served, arch), _local(tp_served, arch), tp_served["url"]
    ranks_before = _rank_actors(arch)
    rebuilds_before = int(handle.info.remote().result()["tp_group_rebuilds"])
    handle.reconfigure.remote(TIGHT).result()
    try:
        with pytest.raises(RemoteError, match="timeout"):
            _long_generate(client, _backend(client, url))
    finally:
        try:
            handle.reconfigure.remote({}).result()
        except Exception:  # the replica is being replaced: its successor starts with {} anyway
            pass
    _serves_the_next_request_as_tp1(client, local, url, "the model did not serve again")
    ranks_after = _rank_actors(arch)
    assert len(ranks_after) == 1  # no orphaned rank
    if ranks_after == ranks_before:
        assert int(handle.info.remote().result()["tp_group_rebuilds"]) == rebuilds_before + 1


def test_user_exception_mid_forward_ends_every_rank_in_step(tp_served: dict[str, Any]) -> None:
    from ray import serve

    def failing(client: Any, backend: Any) -> None:
        with client.trace(PROMPT, backend=backend):
            hidden = layers_of(client)[0].output
            raise ValueError(f"user boom {hidden.shape}")

    before = int(serve.get_app_handle(_app("llama")).info.remote().result()["tp_group_rebuilds"])
    after = _stopped_then_served(tp_served, "llama", failing, "user boom", config={})
    assert after == before  # every rank ended at the same point: nothing to rebuild
