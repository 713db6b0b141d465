"""No credential reaches logs, MLflow params or tags, Prefect logs or artifacts, or the manifest."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import pytest
import yaml

pytestmark = pytest.mark.integration


def test_known_secrets_appear_nowhere(stack, stack_env, digits_in_store, tmp_path):
    secrets = {name: f"sEcReT-{name.lower()}-{uuid.uuid4().hex}" for name in
               ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_KEY_UNUSED")}
    env = {**stack_env, **{k: v for k, v in secrets.items() if k != "AWS_SECRET_ACCESS_KEY"}}
    env["AWS_SECRET_ACCESS_KEY"] = secrets["AWS_SECRET_ACCESS_KEY"]  # moto accepts any key: the sweep really uses it
    env.pop("AWS_SESSION_TOKEN")  # a session token would be sent and checked; keep it out of the request path
    secrets.pop("AWS_SESSION_TOKEN")
    spec = {"name": "secrets", "device": "rpi4", "runner": "threads", "registry_name": "secrets-model",
            "budget": {"max_quality_drop": 1.0},
            "recipes": [{"name": "kd-w25", "steps": [{"kind": "distill", "width": 0.25, "epochs": 3}]}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(tmp_path / "spec.yaml")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    haystacks = {"cli output": proc.stdout + proc.stderr}

    from mlflow import MlflowClient

    client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("secrets")
    for run in client.search_runs([exp.experiment_id]):
        haystacks[f"mlflow run {run.info.run_name}"] = json.dumps([run.data.params, run.data.tags])
        for art in ("measurement.json", "spec.json"):
            if art in {a.path for a in client.list_artifacts(run.info.run_id)}:
                path = client.download_artifacts(run.info.run_id, art, str(tmp_path))
                haystacks[f"{run.info.run_name}/{art}"] = open(path).read()
    for mv in client.search_model_versions("name='secrets-model'"):
        haystacks[f"version {mv.version} tags"] = json.dumps(mv.tags)
    s3 = stack["s3"]
    for obj in s3.list_objects_v2(Bucket="shrinkflow-store", Prefix="models/secrets-model/").get("Contents", []):
        if obj["Key"].endswith(".json"):
            haystacks[obj["Key"]] = s3.get_object(Bucket="shrinkflow-store", Key=obj["Key"])["Body"].read().decode()

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def _prefect():
        async with get_client() as pc:
            logs = await pc.read_logs(log_filter=LogFilter(), limit=200)
            artifacts = await pc.read_artifacts(limit=200)
            runs = await pc.read_flow_runs(limit=200)
        return ([lg.message for lg in logs], [json.dumps(a.data, default=str) for a in artifacts],
                [json.dumps(r.parameters, default=str) for r in runs])
    with temporary_settings(updates={PREFECT_API_URL: stack_env["PREFECT_API_URL"]}):
        logs, artifacts, params = asyncio.run(_prefect())
    assert logs and artifacts
    haystacks |= {"prefect logs": "\n".join(logs), "prefect artifacts": "\n".join(artifacts),
                  "prefect flow run parameters": "\n".join(params)}
    for where, text in haystacks.items():
        for name, value in secrets.items():
            assert value not in text, f"{name} leaked into {where}"
