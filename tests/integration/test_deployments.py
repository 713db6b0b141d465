"""Run it as a service: Prefect and MLflow on PostgreSQL (the session's servers), artifacts in S3,
a process worker, deployments from deployments/prefect.yaml, runs triggered through the API (the UI's Run button)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
from datetime import timezone
from pathlib import Path

import pytest
import yaml

from shrinkflow.budget import DEVICES
from tests.integration.conftest import seed_digits_teacher

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODEL = "digits-phone"
SPEC = {"name": "svc-digits", "workload": "digits", "device": "phone", "runner": "threads", "workers": 1,
        "recipes": [{"name": "kd-w25", "steps": [{"kind": "distill", "width": 0.25, "epochs": 20}]},
                    {"name": "int8-dynamic", "steps": [{"kind": "quantize", "scheme": "int8-dynamic"}]}]}


@pytest.fixture(scope="module")
def service(stack, digits_teacher, tmp_path_factory):
    """The session's Prefect and MLflow servers (both on PostgreSQL), artifacts in its S3 server
    (the store's cache holding the session's digits teacher), the deployments applied, and a
    process worker on the pool."""
    logs = tmp_path_factory.mktemp("svc-logs")
    aws = {k: stack["env"][k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    s3 = stack["env"]["AWS_ENDPOINT_URL_S3"]
    seed_digits_teacher(digits_teacher, {**aws, "AWS_ENDPOINT_URL_S3": s3}, "s3://shrinkflow-store/service")
    home = tmp_path_factory.mktemp("worker-home")
    env = {**os.environ, **aws, "PREFECT_API_URL": stack["env"]["PREFECT_API_URL"],
           "MLFLOW_TRACKING_URI": stack["env"]["MLFLOW_TRACKING_URI"], "AWS_ENDPOINT_URL_S3": s3,
           "SHRINKFLOW_ARTIFACT_STORE": "s3://shrinkflow-store/service", "SHRINKFLOW_HOME": str(home),
           "SHRINKFLOW_REPO": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "2"}  # as `shrinkflow stack up` starts its worker
    env.pop("PREFECT_HOME", None)
    for argv in (["work-pool", "create", "shrinkflow-process", "--type", "process"],
                 ["--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"]):
        proc = subprocess.run([str(BIN / "prefect"), *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "shrinkflow-process"], env=env,
                              cwd=ROOT, stdout=(logs / "worker.log").open("wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    yield {"env": env, "prefect": env["PREFECT_API_URL"], "mlflow": env["MLFLOW_TRACKING_URI"], "logs": logs,
           "s3": stack["s3"]}
    os.killpg(worker.pid, 15)
    try:
        worker.wait(timeout=8)  # it exits in a few seconds when it does; waiting longer only delays the suite
    except subprocess.TimeoutExpired:  # prefect's worker sometimes ignores the SIGINT it forwards itself
        os.killpg(worker.pid, 9)
        worker.wait(timeout=30)


@contextlib.contextmanager
def _in_env(env: dict):
    """Point this process's Prefect and MLflow clients at the service, for the block only (later
    tests must not inherit its tracking URI or store)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with pytest.MonkeyPatch.context() as mp, temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        for key in ("MLFLOW_TRACKING_URI", "SHRINKFLOW_ARTIFACT_STORE", "AWS_ENDPOINT_URL_S3"):
            mp.setenv(key, env[key])
        yield


def _trigger(env, name, parameters, timeout=900):
    from prefect.deployments import run_deployment

    with _in_env(env):
        run = run_deployment(name, parameters=parameters, timeout=timeout)
    assert run.state.is_completed(), f"{name}: {run.state}\n" + (env and "")
    return run


def test_every_deployment_parameter_validates_against_its_flow():
    from flows.compress import compress_flow
    from flows.promote import promote_flow

    flows = {"flows/compress.py:compress_flow": compress_flow, "flows/promote.py:promote_flow": promote_flow}
    deployments = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]
    assert {d["name"] for d in deployments} == {"nightly", "on-demand", "promote"}
    by_hand = {"promote": {"request": {"model": "digits-rpi4", "version": 1}}}  # typed into the form by a person
    for d in deployments:
        flows[d["entrypoint"]].validate_parameters((d.get("parameters") or {}) | by_hand.get(d["name"], {}))


def test_ui_run_promotes_and_the_server_stores_a_real_form(service):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    env = service["env"]
    run = _trigger(env, "compress/on-demand", {"spec": SPEC})
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(MODEL, "champion")
    exp = client.get_experiment_by_name("svc-digits")
    children = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("role") != "sweep"]
    assert sorted(r.info.run_name for r in children) == ["int8-dynamic", "kd-w25", "teacher"]
    manifest_key = f"service/{MODEL}/v{champion.version}/manifest.json"
    manifest = json.loads(service["s3"].get_object(Bucket="shrinkflow-store", Key=manifest_key)["Body"].read())
    for entry in manifest["files"]:
        body = service["s3"].get_object(Bucket="shrinkflow-store", Key=f"service/{MODEL}/v{champion.version}/{entry['path']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]
    assert manifest["mlflow_run_id"] == champion.run_id

    async def _server_side():
        async with get_client() as pc:
            deps = {d.name: d for d in await pc.read_deployments()}
            flow_run = await pc.read_flow_run(run.id)
            return deps, flow_run
    with _in_env(env):
        deps, flow_run = asyncio.run(_server_side())
    assert flow_run.parameters["spec"]["device"] == "phone"
    schema = deps["on-demand"].parameter_openapi_schema
    defs = schema["definitions"]
    sweep = defs["SweepSpec"]["properties"]
    assert set(sweep["device"]["enum"]) == set(DEVICES) and "phone-entry" in DEVICES
    assert defs["Recipe"]["properties"]["runtime"]["enum"] == ["torch", "executorch", "onnx"]
    assert sweep["device"]["description"] and sweep["seed"]["title"] == "Seed"
    assert set(defs["QuantSpec"]["properties"]["scheme"]["enum"]) >= {"int8-dynamic", "int8-static", "fp16"}
    assert defs["PruneSpec"]["properties"]["ratio"]["exclusiveMaximum"] == 1
    assert set(defs["PromoteRequest"]["properties"]) == {"model", "version", "rollback"} if "PromoteRequest" in defs else True
    assert deps["promote"].parameter_openapi_schema["properties"]["request"]


def test_invalid_parameters_are_rejected_before_the_run(service):
    from prefect.deployments import run_deployment

    with _in_env(service["env"]), pytest.raises(Exception) as err:
        run_deployment("compress/on-demand", parameters={"spec": {**SPEC, "device": "toaster"}}, timeout=0)
    assert "device" in str(err.value) or "toaster" in str(err.value)


def test_nightly_is_scheduled_as_the_cron_says(service):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    async def _scheduled():
        async with get_client() as pc:
            dep = await pc.read_deployment_by_name("compress/nightly")
            for _ in range(60):
                runs = await pc.read_flow_runs(
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["nightly"])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
                if len(runs) >= 3:
                    return dep, runs
                await asyncio.sleep(1)
            return dep, runs
    with _in_env(service["env"]):
        dep, runs = asyncio.run(_scheduled())
    assert [s.schedule.cron for s in dep.schedules] == ["0 2 * * *"]
    assert len(runs) >= 3
    times = sorted(r.expected_start_time.astimezone(timezone.utc) for r in runs)
    assert all((t.hour, t.minute) == (2, 0) for t in times)
    assert len({t.date() for t in times}) == len(times)  # one a day


def test_promote_flow_rolls_back_by_hand(service):
    from mlflow import MlflowClient

    env = service["env"]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    before = client.get_model_version_by_alias(MODEL, "champion")
    worse = {**SPEC, "recipes": [{"name": "kd-w25-short", "steps": [{"kind": "distill", "width": 0.25, "epochs": 1}]}],
             "budget": {"max_quality_drop": 1.0}}
    _trigger(env, "compress/on-demand", {"spec": worse})
    latest = max(client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
    assert latest.tags["promotion"] == "rejected"
    assert client.get_model_version_by_alias(MODEL, "champion").version == before.version

    refused = _trigger(env, "promote/promote", {"request": {"model": MODEL, "version": int(latest.version)}})
    assert client.get_model_version_by_alias(MODEL, "champion").version == before.version
    _trigger(env, "promote/promote", {"request": {"model": MODEL, "version": int(latest.version), "rollback": True}})
    now = client.get_model_version(MODEL, latest.version)
    assert client.get_model_version_by_alias(MODEL, "champion").version == latest.version
    assert now.tags["promotion"] == "accepted" and "rollback" in now.tags["promotion_reason"]
    key = f"service/{MODEL}/v{latest.version}/manifest.json"
    assert json.loads(service["s3"].get_object(Bucket="shrinkflow-store", Key=key)["Body"].read())["registry_version"] == latest.version
    assert refused.state.is_completed()
