"""Tensor parallelism inside a model replica.

- `plans`: which TP plan a checkpoint is split by (its own `base_model_tp_plan`, else the
  project's table in `ndif_operator.api.parallel`) and the `ParallelDims` of a replica;
- `shard_loading`: each rank reads only its slices of the safetensors files (counted);
- `ranks`: the k-1 shard actors a replica owns, the process group, and running one request on
  every rank.
"""
