"""The digits sweep through the real CLI against real Prefect, MLflow and S3 servers."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
import yaml
from mlflow import MlflowClient

pytestmark = pytest.mark.integration

MODEL = "digits-mcu-nrf52840"
SPEC = {
    "name": "it-digits",
    "workload": "digits",
    "device": "mcu-nrf52840",
    "recipes": [
        {"name": "kd-w25", "steps": [{"kind": "distill", "width": 0.25, "epochs": 30}]},
        {"name": "kd-w50+int8-static", "steps": [{"kind": "distill", "width": 0.5, "epochs": 20},
                                                 {"kind": "quantize", "scheme": "int8-static"}]},
        {"name": "prune-global-30", "steps": [{"kind": "prune", "method": "magnitude-global", "ratio": 0.3}]},
    ],
}


def shrinkflow(args, env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    return proc


def write_spec(tmp_path, spec, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_sweep_promotes_registers_and_stores_the_winner(stack, stack_env, digits_in_store, tmp_path):
    proc = shrinkflow(["run", write_spec(tmp_path, SPEC)], stack_env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "ERROR" not in proc.stdout + proc.stderr  # a successful run: library logs stay quiet (-v shows them)
    assert "View run" not in proc.stdout  # nor MLflow's per-run lines
    assert " kB " in proc.stdout and "peak memory" in proc.stdout  # the final table

    client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("it-digits")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("role") == "sweep")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"teacher", "kd-w25", "kd-w50+int8-static", "prune-global-30"}
    assert parent.data.tags["prefect.flow_run_id"] and parent.data.tags["spec_hash"] and parent.data.tags["device"] == "mcu-nrf52840"
    assert children["prune-global-30"].data.tags["skipped_reason"].startswith("needs")
    assert children["teacher"].data.tags["role"] == "baseline"
    assert children["kd-w25"].data.params["steps.0.width"] == "0.25"
    assert {"quality", "size_bytes", "latency_p50_ms", "latency_p95_ms", "peak_memory_bytes", "energy_mj", "macs"} <= set(children["kd-w25"].data.metrics)
    assert "pareto.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    # the alias resolves to the selected variant: the best fitting child by quality, then latency, then size
    champion = client.get_model_version_by_alias(MODEL, "champion")
    fitting = [r for r in children.values() if r.data.tags.get("fits_budget") == "true" and r.info.run_name != "teacher"]
    best = min(fitting, key=lambda r: (-r.data.metrics["quality"], r.data.metrics["latency_p50_ms"], r.data.metrics["size_bytes"]))
    assert champion.run_id == best.info.run_id
    assert champion.tags["promotion"] == "accepted" and champion.tags["source_run"] == best.info.run_id

    # manifest in S3: every checksum matches the stored object
    s3 = stack["s3"]
    prefix = f"models/{MODEL}/v{champion.version}"
    manifest = json.loads(s3.get_object(Bucket="shrinkflow-store", Key=f"{prefix}/manifest.json")["Body"].read())
    assert manifest["registry_version"] == str(champion.version) and manifest["mlflow_run_id"] == best.info.run_id
    assert manifest["prefect_flow_run_id"] == parent.data.tags["prefect.flow_run_id"]
    for entry in manifest["files"]:
        body = s3.get_object(Bucket="shrinkflow-store", Key=f"{prefix}/{entry['path']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"] and len(body) == entry["size"]
    pointer = json.loads(s3.get_object(Bucket="shrinkflow-store", Key=f"models/{MODEL}/champion.json")["Body"].read())
    assert pointer["version"] == str(champion.version)

    # a fresh process loads the registered model and reproduces the reported quality on the test split
    check = textwrap.dedent(f"""
        import mlflow, torch
        from shrinkflow.workloads import accuracy
        from shrinkflow.workloads.digits import splits
        model = mlflow.pytorch.load_model("models:/{MODEL}@champion")
        print(accuracy(model, splits(0)[2]))
    """)
    fresh = subprocess.run([sys.executable, "-c", check], env=stack_env, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert float(fresh.stdout.strip().splitlines()[-1]) == pytest.approx(best.data.metrics["quality"], abs=1e-9)

    # pull verifies checksums and writes the files
    pulled = shrinkflow(["pull", f"models:/{MODEL}@champion", "--out", str(tmp_path / "pulled")], stack_env, tmp_path)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    assert (tmp_path / "pulled" / "manifest.json").exists() and (tmp_path / "pulled" / "model.pt2.xz").exists()

    # a second, worse run registers its winner but does not move the alias
    worse = {**SPEC, "recipes": [{"name": "kd-w25-short", "steps": [{"kind": "distill", "width": 0.25, "epochs": 1}]}],
             "budget": {"max_quality_drop": 1.0}}
    again = shrinkflow(["run", write_spec(tmp_path, worse, "worse.yaml")], stack_env, tmp_path)
    assert again.returncode == 0, again.stderr[-5000:]
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion.version
    latest = max(client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
    assert int(latest.version) > int(champion.version)
    assert latest.tags["promotion"] == "rejected" and "not beaten" in latest.tags["promotion_reason"]
