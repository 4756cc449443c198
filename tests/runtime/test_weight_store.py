"""The node-local weight store: a replica that replaces another maps its weights from shared memory.

Through real Ray: the store is a detached actor, the weights live in Ray's object store, and the
WARM → HOT change is the one the renderer emits (other `ray_actor_options`), which Serve applies by
replacing the replica.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from model_runtime.tiny_models import build_tiny_model
from ndif_operator.api import ModelAppArgs
from runtime.conftest import model_args

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPT = "The Eiffel Tower is in the city of"


def _logits(model: Any) -> torch.Tensor:
    with model.trace(PROMPT):
        logits = model.lm_head.output.save()
    return logits


def test_fill_then_map_gives_the_same_model_and_eviction_frees_it(
    serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import ray

    from model_runtime import weight_store
    from model_runtime.replica import host_copy
    from model_runtime.replica.loading import load_model

    path = build_tiny_model("llama-tied", tmp_path_factory.mktemp("store") / "tied")
    args = ModelAppArgs.model_validate(model_args(path, "default/tied"))
    filled = host_copy.obtain(args, lambda: load_model(args))
    assert isinstance(filled, host_copy.StoreCopy) and filled.source_kind == "localPath"

    def no_disk() -> Any:
        raise AssertionError("a second replica on the node must map the store, not load")

    from model_runtime.sandbox import integrity

    filler_index = integrity.integrity_for(filled.model._module)  # its own tensors, whose bytes the store holds
    assert filler_index.kept_bytes == 0 and filler_index.source_bytes == filled.nbytes
    integrity.forget(filled.model._module)

    mapped = host_copy.obtain(args, no_disk)
    assert mapped.source_kind == host_copy.NODE_MEMORY
    module = mapped.model._module
    assert next(module.parameters()).device.type == "meta"  # mapped, nothing copied yet
    mapped.to_device("cpu")
    assert module.lm_head.weight is module.model.embed_tokens.weight  # ties survive
    assert not module.training
    expected = filled.model._module.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in module.state_dict().items())
    assert torch.equal(_logits(mapped.model), _logits(filled.model))

    mapped.to_host()  # WARM: the replica's own copy is gone, the store keeps one
    assert next(module.parameters()).device.type == "meta"
    mapped.to_device("cpu")
    assert torch.equal(_logits(mapped.model), _logits(filled.model))
    _tampering_is_restored_from_the_store(mapped, expected)

    store = weight_store.node_store()
    assert [e["model_key"] for e in ray.get(store.contents.remote())].count(args.model_key) == 1
    _the_index_outlives_the_store_entry(mapped, filled, store, args.model_key, expected)
    mapped.release()  # COLD
    assert args.model_key not in [e["model_key"] for e in ray.get(store.contents.remote())]


def _tampering_is_restored_from_the_store(copy: Any, expected: dict[str, torch.Tensor]) -> None:
    """After WARM → HOT, the first request's integrity index restores from the store's arrays (it
    keeps no copy of its own), and a write no guard saw is undone from them."""
    import numpy

    from model_runtime.sandbox import integrity
    from model_runtime.sandbox.errors import ModelTampering

    module = copy.model._module
    integrity.forget(module)  # as the replica does after a level move
    record = integrity.integrity_for(module)
    record.admit()
    assert record.kept_bytes == 0 and record.source_bytes == copy.nbytes
    numpy.asarray(module.model.layers[0].mlp.up_proj.weight.detach())[:] = 0
    with pytest.raises(ModelTampering, match="weights were restored"):
        record.verify()
    assert all(torch.equal(expected[k], v) for k, v in module.state_dict().items())
    record.admit()
    record.verify()
    integrity.forget(module)


def _the_index_outlives_the_store_entry(copy: Any, filler: Any, store: Any, model_key: str,
                                        expected: dict[str, torch.Tensor]) -> None:
    """The index holds the store's arrays it restores from: once the store evicted the model (the
    gateway made it COLD while the replica still serves) and every replica dropped its references,
    their pages stay mapped, and a restore still reads the pristine bytes."""
    import gc

    import numpy
    import ray

    from model_runtime.sandbox import integrity
    from model_runtime.sandbox.errors import ModelTampering

    module = copy.model._module
    record = integrity.integrity_for(module)
    record.admit()
    for replica in (copy, filler):
        integrity.restore_from(replica.model._module, None)
        replica._arrays, replica._refs = None, []
    assert ray.get(store.evict_model.remote(model_key)) == 1
    gc.collect()
    others = [ray.put(numpy.full(copy.nbytes, 0x5A, dtype=numpy.uint8)) for _ in range(3)]  # would reuse freed pages
    numpy.asarray(module.model.layers[0].mlp.up_proj.weight.detach())[:] = 0
    with pytest.raises(ModelTampering, match="weights were restored"):
        record.verify()
    assert all(torch.equal(expected[k], v) for k, v in module.state_dict().items())
    integrity.forget(module)
    del others


def test_rendered_warm_to_hot_change_replaces_the_replica_which_maps_the_weights(
    serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """WARM asks Ray for the host memory of the copy, HOT does not (renderer): Serve replaces the
    replica, and the new one gets its weights from the node's store, not from disk."""
    from ray import serve
    from ray.serve.api import RunTarget

    from model_runtime.replica import app as model_app

    path = build_tiny_model("llama", tmp_path_factory.mktemp("store") / "swap", seed=3)
    args = model_args(path, "default/swap")
    app = "md-default-swap"

    def deploy(level: str, actor_options: dict[str, Any]) -> dict[str, Any]:
        target = model_app.ModelReplica.options(ray_actor_options=actor_options,
                                                user_config={"level": level}).bind(args)
        serve.run_many([RunTarget(target=target, name=app, route_prefix=None)])
        return dict(serve.get_app_handle(app).info.remote().result())

    try:
        warm = deploy("Warm", {"num_cpus": 0, "num_gpus": 0, "memory": 2 * 1024**2})
        assert warm["level"] == "Warm" and warm["source"] == "localPath"
        hot = deploy("Hot", {"num_cpus": 0, "num_gpus": 0})
        assert hot["startup"]["process_started"] != warm["startup"]["process_started"]  # a new replica
        assert hot["level"] == "Hot" and hot["source"] == "nodeMemory"
        back = deploy("Warm", {"num_cpus": 0, "num_gpus": 0, "memory": 2 * 1024**2})  # HOT → WARM
        assert back["level"] == "Warm" and back["source"] == "nodeMemory"
    finally:
        serve.delete(app)
