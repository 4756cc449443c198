"""A tensor-parallel rank asks Ray for exactly its bundle, pinned GPU share included."""

from __future__ import annotations

from model_runtime.replica.parallel.ranks import shard_actor_options


def test_a_pinned_bundle_becomes_the_ranks_own_resources() -> None:
    options = shard_actor_options({"CPU": 1.0, "ndif_gpu_3": 0.5})
    assert options == {"num_cpus": 1.0, "num_gpus": 0, "resources": {"ndif_gpu_3": 0.5}, "max_concurrency": 4}


def test_an_unpinned_gpu_bundle_and_no_bundle() -> None:
    assert shard_actor_options({"CPU": 0.01, "GPU": 1.0}) == {"num_cpus": 0.01, "num_gpus": 1.0,
                                                             "max_concurrency": 4}
    assert shard_actor_options(None) == {"num_cpus": 0, "max_concurrency": 4}
