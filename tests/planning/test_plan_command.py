"""`ndif-operator plan`: the dry-run preview on the shipped examples and on edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ndif_operator.api import ModelSpec
from ndif_operator.cli import main
from ndif_operator.commands.plan import inventory_from_mapping
from ndif_operator.evaluation import EstimateCache, evaluate
from ndif_operator.evaluation.catalog import KNOWN_MODELS, catalog_entry, catalog_weights

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
INVENTORY = ROOT / "inventories" / "example.yaml"


def write_checkpoint(path: Path) -> Path:
    """A minimal safetensors checkpoint written by hand (no torch): 2 float32 tensors + config.json."""
    path.mkdir(parents=True)
    header = {"wte.weight": {"dtype": "F32", "shape": [300, 64], "data_offsets": [0, 76800]},
              "ln.weight": {"dtype": "F32", "shape": [64], "data_offsets": [76800, 77056]}}
    raw = json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(77056))
    (path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 300, "n_positions": 128}
    ))
    return path


def run_plan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["plan", *args])
    return code, capsys.readouterr().out


def test_preview_of_the_examples(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_plan(capsys, "-f", str(EXAMPLES), "--inventory", str(INVENTORY))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["NAMESPACE", "NAME", "MODEL", "WANT", "LEVEL"]
    rows = {line.split()[1]: line for line in lines[1:6]}
    assert set(rows) == {"gpt2", "llama-3-1-70b", "llama-3-1-8b", "llama-3-1-8b-instruct", "pythia-1-4b"}
    # tensorParallelSize 4, each rank on a share of its own GPU
    assert "1x(4x0." in rows["llama-3-1-70b"] and "h100/" in rows["llama-3-1-70b"]
    assert " Warm " in rows["llama-3-1-8b"]
    assert "4x0." in rows["llama-3-1-8b-instruct"]  # autoscaling max 4, each on a GPU share
    assert "GPUs used:" in out and "seed catalog" in out


def test_json_output_and_a_model_that_cannot_be_sized(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    manifests = tmp_path / "m"
    manifests.mkdir()
    (manifests / "unknown.yaml").write_text(yaml.safe_dump({
        "apiVersion": "ndif.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "mystery", "namespace": "lab"}, "spec": {"model": {"repoId": "someone/unknown-7b"}},
    }))
    code, out = run_plan(capsys, "-f", str(manifests), "-f", str(EXAMPLES / "01-small-model-hot.yaml"),
                         "--inventory", str(INVENTORY), "-o", "json")
    assert code == 0
    body = json.loads(out)
    by_key = {d["key"]: d for d in body["decisions"]}
    assert by_key["lab/mystery"]["level"] == "Cold" and by_key["lab/mystery"]["reason"] == "EstimatePending"
    assert "not in the seed catalog" in by_key["lab/mystery"]["sizingError"]
    assert by_key["ndif/gpt2"]["level"] == "Hot" and by_key["ndif/gpt2"]["gpuFraction"] < 1


def test_local_checkpoints_are_sized_from_headers_and_cache_files_are_used(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model_dir = write_checkpoint(tmp_path / "tiny")
    doc = {
        "apiVersion": "ndif.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "tiny", "namespace": "t"},
        "spec": {"model": {"repoId": "tiny/gpt2", "source": {"localPath": {"path": str(model_dir)}}}},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(doc))
    code, out = run_plan(capsys, "-f", str(tmp_path / "tiny.yaml"), "--inventory", str(INVENTORY))
    assert code == 0 and "checkpoint headers (1)" in out
    # The same model through a ConfigMap cache: no checkpoint needed any more.
    from datetime import UTC, datetime

    entry = evaluate(ModelSpec.model_validate(doc["spec"]["model"]), now=datetime.now(UTC))
    cache = EstimateCache()
    cache.put(entry)
    (tmp_path / "cache.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": cache.to_configmap_data()}
    ))
    for f in model_dir.iterdir():
        f.unlink()
    code, out = run_plan(capsys, "-f", str(tmp_path / "tiny.yaml"), "--inventory", str(INVENTORY),
                         "--cache", str(tmp_path / "cache.yaml"))
    assert code == 0 and "checkpoint headers (1)" in out and " Hot " in out


def test_bad_inventory_is_reported(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "inv.yaml"
    bad.write_text("workerGroups:\n  - {name: x, pods: 1, gpuMemory: lots}\n")
    code = main(["plan", "-f", str(EXAMPLES), "--inventory", str(bad)])
    assert code == 2 and "gpuMemory" in capsys.readouterr().err  # errors go to stderr
    with pytest.raises(ValueError, match="name is required"):
        inventory_from_mapping({"workerGroups": [{"pods": 1}]})
    with pytest.raises(ValueError, match="unknown fields"):
        inventory_from_mapping({"workerGroups": [{"name": "a", "pods": 1, "gpus": 8}]})


@pytest.mark.parametrize(("group", "message"), [
    ({"gpuMemory": 80}, r"gpuMemory: 80 has no memory unit; write e.g. 80Gi"),
    ({"gpuMemory": "80"}, r"has no memory unit"),
    ({"cpuMemory": "1.5"}, r"cpuMemory: '1.5' has no memory unit"),
    ({"gpuMemory": "80m"}, r"has no memory unit"),  # milli-bytes: a unit, not a memory unit
    ({"pods": 2.7}, r"pods: expected a whole number, got 2.7"),
    ({"pods": "two"}, r"pods: expected a whole number"),
    ({"gpusPerPod": True}, r"gpusPerPod: expected a whole number"),
    ({"gpusPerPod": 8, "gpuMemory": None}, r"gpuMemory: expected a quantity with a unit"),
])
def test_inventory_quantities_carry_units_and_counts_are_whole(group: dict[str, object], message: str) -> None:
    entry = {"name": "h100", "pods": 2, "gpusPerPod": 8, "gpuMemory": "80Gi", "cpuMemory": "1500Gi", **group}
    with pytest.raises(ValueError, match=message):
        inventory_from_mapping({"workerGroups": [entry]})
    without = {"name": "h100", "pods": 2, "gpusPerPod": 8}
    with pytest.raises(ValueError, match="gpuMemory is required"):
        inventory_from_mapping({"workerGroups": [without]})
    ok = inventory_from_mapping({"workerGroups": [{"name": "a", "pods": 2.0, "gpusPerPod": "8", "gpuMemory": "141G"}]})
    assert (ok.groups[0].pods, ok.groups[0].gpus_per_pod, ok.groups[0].gpu_memory_bytes) == (2, 8, 141 * 10**9)


def test_catalog_sizes_follow_the_dtype() -> None:
    llama = next(m for m in KNOWN_MODELS if m.repo_id == "meta-llama/Llama-3.1-70B")
    bf16, _ = catalog_weights(llama, "bfloat16")  # type: ignore[arg-type]
    fp32, _ = catalog_weights(llama, "float32")  # type: ignore[arg-type]
    assert 141e9 < bf16 < 141.2e9 and fp32 > 2 * bf16 - 1000
    entry = catalog_entry(ModelSpec(repo_id="META-LLAMA/llama-3.1-70b"))
    assert entry is not None and entry.method == "Config"
    assert catalog_entry(ModelSpec(repo_id="nobody/nothing")) is None
