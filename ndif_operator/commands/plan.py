"""Dry-run placement preview: size and plan ModelDeployment manifests against an inventory.

    ndif-operator plan -f examples --inventory inventories/example.yaml

Nothing is applied. Each model is sized the way the operator sizes it: from an evaluator cache
file (`--cache`, a ConfigMap manifest or its `data`), else from its checkpoint's safetensors
headers when they are on this machine (localPath, Hugging Face cache; `--fetch` also reads S3 and
the Hub), else from the seed catalog of well-known models. Models that cannot be sized are
planned as Cold and listed with the reason.

Inventory file (YAML):

    workerGroups:
      - {name: h100, pods: 2, gpusPerPod: 8, gpuMemory: 80Gi, cpuMemory: 1500Gi}
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from ndif_operator.api import KIND, Estimate, Level, ModelDeployment, ModelSpec
from ndif_operator.api.units import human_bytes
from ndif_operator.commands.preflight import missing_model_dirs
from ndif_operator.evaluation import EstimateCache, EstimateError, estimate, estimate_from_entry
from ndif_operator.evaluation.catalog import catalog_entry
from ndif_operator.evaluation.sources import hf_cache_snapshot
from ndif_operator.planning import Decision, Inventory, Plan, WorkerGroup, plan
from ndif_operator.planning.requests import placement_request

HELP = "dry-run placement preview of manifests against an inventory file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", dest="paths", action="append", type=Path, required=True,
                        help="ModelDeployment YAML file or directory (repeatable)")
    parser.add_argument("--inventory", type=Path, required=True, help="inventory YAML (worker groups)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="evaluator cache: a ConfigMap manifest (or its data) written by the operator")
    parser.add_argument("--fetch", action="store_true",
                        help="also read headers from S3 and the Hugging Face Hub (network)")
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")


# --- inputs -------------------------------------------------------------------------------------


def inventory_from_mapping(data: Any) -> Inventory:
    """Parse an inventory document: `workerGroups: [{name, pods, gpusPerPod, gpuMemory, cpuMemory}]`.

    Memory needs its unit (`80Gi`; a bare `80` is refused, not read as 80 bytes); counts must be
    whole numbers (`pods: 2.7` is refused, not truncated). `gpuMemory` is required with GPUs.
    """
    from ndif_operator.operator.quantity import memory_bytes, whole_count

    if not isinstance(data, Mapping) or not isinstance(data.get("workerGroups"), list):
        raise ValueError("inventory must be a mapping with a workerGroups list")
    groups = []
    for i, g in enumerate(data["workerGroups"]):
        where = f"workerGroups[{i}]"
        if not isinstance(g, Mapping):
            raise ValueError(f"{where} must be a mapping")
        unknown = set(g) - {"name", "pods", "gpusPerPod", "gpuMemory", "cpuMemory"}
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        try:
            gpus = whole_count(g.get("gpusPerPod", 0), f"{where}.gpusPerPod")
            groups.append(WorkerGroup(
                name=str(g["name"]),
                pods=whole_count(g["pods"], f"{where}.pods"),
                gpus_per_pod=gpus,
                gpu_memory_bytes=memory_bytes(g["gpuMemory"], f"{where}.gpuMemory") if gpus or "gpuMemory" in g
                else 0,
                cpu_memory_bytes=memory_bytes(g["cpuMemory"], f"{where}.cpuMemory") if "cpuMemory" in g else 0,
            ))
        except KeyError as exc:
            raise ValueError(f"{where}: {exc.args[0]} is required") from exc
        except TypeError as exc:  # e.g. `pods: [1]`
            raise ValueError(f"{where}: {exc}") from exc
    return Inventory(tuple(groups))


def load_deployments(paths: list[Path], skip: set[Path]) -> list[ModelDeployment]:
    """ModelDeployments of the given files/directories; other YAML documents are ignored."""
    from ndif_operator.local.manifests import ManifestError, deployment_key, parse_manifests

    found: list[ModelDeployment] = []
    for path in paths:
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
        for file in files:
            if file.resolve() in skip:
                continue
            try:
                docs = [d for d in yaml.safe_load_all(file.read_text()) if isinstance(d, dict)]
            except (OSError, yaml.YAMLError) as exc:
                raise ManifestError(f"{file}: {exc}") from exc
            for doc in docs:
                if doc.get("kind") == KIND:
                    found.extend(parse_manifests(yaml.safe_dump(doc), str(file)))
    keys = [deployment_key(md) for md in found]
    if len(set(keys)) != len(keys):
        raise ManifestError(f"a ModelDeployment is defined twice: {sorted(k for k in keys if keys.count(k) > 1)}")
    return found


def load_cache(path: Path | None) -> EstimateCache:
    if path is None:
        return EstimateCache()
    doc = yaml.safe_load(path.read_text())
    data = doc.get("data", doc) if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a ConfigMap or a mapping of cache entries")
    return EstimateCache.from_configmap_data({str(k): str(v) for k, v in data.items()})


# --- sizing ---------------------------------------------------------------------------------------


def _readable_here(model: ModelSpec, fetch: bool) -> bool:
    if fetch or model.source.local_path is not None:
        return True
    return model.source.s3 is None and hf_cache_snapshot(model.repo_id, model.revision) is not None


def size(md: ModelDeployment, cache: EstimateCache, *, fetch: bool, now: datetime) -> Estimate | str:
    """The estimate of `md`, or why it could not be sized."""
    model, limits = md.spec.model, md.spec.limits
    problem = ""
    if cache.get_for(model) is not None or _readable_here(model, fetch):
        try:
            return estimate(model, limits, cache, now=now)
        except EstimateError as exc:
            problem = str(exc)
    entry = catalog_entry(model)
    if entry is not None:
        return estimate_from_entry(entry, limits)
    if not problem:
        where = "S3" if model.source.s3 is not None else "the Hugging Face Hub"
        problem = f"checkpoint not on this machine and not in the seed catalog (use --fetch to read {where})"
    return problem


# --- output ---------------------------------------------------------------------------------------


def _gpus(d: Decision) -> str:
    if d.level != Level.HOT or not d.replicas:
        return "-"
    tp = d.tensor_parallel_size
    if d.gpu_fraction >= 1:
        per = f"{tp}"
    else:  # a share of one GPU, or of each of a tensor-parallel replica's GPUs
        per = f"{d.gpu_fraction:g}" if tp == 1 else f"({tp}x{d.gpu_fraction:g})"
    return f"{d.replicas}x{per}"


def _where(d: Decision) -> str:
    if not d.worker_group:
        return "-"
    pods = sorted({a.pod for a in d.assignments})
    return f"{d.worker_group}/" + ",".join(str(p) for p in pods)


def table(deployments: list[ModelDeployment], sized: dict[str, Estimate | str], result: Plan) -> str:
    headers = ["NAMESPACE", "NAME", "MODEL", "WANT", "LEVEL", "GPUS", "GROUP/PODS", "ESTIMATE", "REASON", "MESSAGE"]
    rows = []
    for md in sorted(deployments, key=_key):
        d, s = result.decision(_key(md)), sized[_key(md)]
        rows.append([
            str(md.metadata["namespace"]), str(md.metadata["name"]), md.spec.model.repo_id, str(md.spec.level),
            str(d.level), _gpus(d), _where(d), s.total if isinstance(s, Estimate) else "?", str(d.reason),
            d.message,
        ])
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers) - 1)]
    lines = ["   ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "   " + r[-1]
             for r in [headers, *rows]]
    lines.append("")
    lines.append(f"GPUs used: {result.gpus_used} of {result.gpus_total}; "
                 f"GPU memory reserved: {human_bytes(result.gpu_memory_reserved_bytes)}")
    unsized = [(k, v) for k, v in sorted(sized.items()) if isinstance(v, str)]
    if unsized:
        lines.append("Could not be sized (planned Cold):")
        lines.extend(f"  {k}: {why}" for k, why in unsized)
    methods: dict[str, int] = {}
    for v in sized.values():
        if isinstance(v, Estimate):
            methods[v.method] = methods.get(v.method, 0) + 1
    described = {"SafetensorsHeaders": "checkpoint headers", "MetaDevice": "meta-device evaluator",
                 "Config": "seed catalog / config"}
    lines.append("Sized from: " + ", ".join(f"{described.get(m, m)} ({n})" for m, n in sorted(methods.items())))
    shapes = [(k, v.parallel) for k, v in sorted(sized.items()) if isinstance(v, Estimate) and v.parallel]
    if shapes:
        lines.append("tensorParallelSize each model allows (heads / kv heads / MLP width must divide; a TP plan):")
        lines.extend(f"  {k}: {', '.join(map(str, p.tensor_parallel_sizes))}   ({p.model_type or 'type unknown'}: "
                     f"{p.num_attention_heads} heads, {p.num_key_value_heads} kv heads, "
                     f"intermediate {p.intermediate_size})" for k, p in shapes)
    return "\n".join(lines)


def as_json(sized: dict[str, Estimate | str], result: Plan) -> str:
    out = []
    for d in result.decisions:
        s = sized[d.key]
        out.append({
            "key": d.key, "level": str(d.level), "replicas": d.replicas, "gpusPerReplica": d.gpus_per_replica,
            "gpuFraction": d.gpu_fraction, "workerGroup": d.worker_group,
            "assignments": [{"pod": a.pod, "gpus": list(a.gpus), "fraction": a.fraction} for a in d.assignments],
            "reason": str(d.reason), "message": d.message,
            "estimate": s.model_dump(mode="json") if isinstance(s, Estimate) else None,
            "sizingError": s if isinstance(s, str) else None,
        })
    return json.dumps({"decisions": out, "gpusUsed": result.gpus_used, "gpusTotal": result.gpus_total}, indent=2)


def _key(md: ModelDeployment) -> str:
    return f"{md.metadata['namespace']}/{md.metadata['name']}"


def run(args: argparse.Namespace) -> int:
    from ndif_operator.local.manifests import ManifestError

    now = datetime.now(UTC)
    try:
        inventory = inventory_from_mapping(yaml.safe_load(args.inventory.read_text()))
        deployments = load_deployments(args.paths, skip={args.inventory.resolve()})
        cache = load_cache(args.cache)
    except (OSError, ValueError, ManifestError, yaml.YAMLError) as exc:
        print(f"ndif-operator plan: error: {exc}", file=sys.stderr)
        return 2
    if not deployments:
        print("ndif-operator plan: error: no ModelDeployment found in the given files", file=sys.stderr)
        return 2
    missing = missing_model_dirs(deployments)
    sized = {_key(md): size(md, cache, fetch=args.fetch, now=now) for md in deployments}
    requests = [placement_request(_key(md), md, s if isinstance(s := sized[_key(md)], Estimate) else None)
                for md in deployments]
    result = plan(inventory, requests, now=now)
    print(table(deployments, sized, result) if args.output == "table" else as_json(sized, result))
    for problem in missing:
        print(f"ndif-operator plan: error: {problem}", file=sys.stderr)
    return 1 if missing else 0
