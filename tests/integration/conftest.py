"""Session fixtures: one S3 endpoint (moto server mode), one Prefect API server, one MLflow server."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration import servers

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """Starts the three servers in parallel and yields the environment a client needs to reach them."""
    for binary in ("moto_server", "prefect", "mlflow"):
        servers.require(binary)
    logs = tmp_path_factory.mktemp("server-logs")
    started = []
    s3, s3_url = servers.moto(logs)
    started.append(s3)
    import boto3

    s3c = boto3.client("s3", endpoint_url=s3_url, **{k.lower(): v for k, v in AWS.items() if k != "AWS_DEFAULT_REGION"},
                       region_name="us-east-1")
    for bucket in ("mlflow-artifacts", "shrinkflow-store"):
        s3c.create_bucket(Bucket=bucket)
    mlflow_env = {**AWS, "MLFLOW_S3_ENDPOINT_URL": s3_url, "AWS_ENDPOINT_URL_S3": s3_url}
    db = tmp_path_factory.mktemp("mlflow-db") / "mlflow.db"
    try:
        with ThreadPoolExecutor(2) as pool:
            pf = pool.submit(servers.prefect, logs, tmp_path_factory.mktemp("prefect-home"))
            ml = pool.submit(servers.mlflow, logs, f"sqlite:///{db}", "s3://mlflow-artifacts", mlflow_env)
            (pf_server, pf_url), (ml_server, ml_url) = pf.result(), ml.result()
        started += [pf_server, ml_server]
        env = {**AWS, "PREFECT_API_URL": pf_url, "MLFLOW_TRACKING_URI": ml_url, "AWS_ENDPOINT_URL_S3": s3_url,
               "MLFLOW_S3_ENDPOINT_URL": s3_url, "SHRINKFLOW_ARTIFACT_STORE": "s3://shrinkflow-store/models",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        yield {"env": env, "s3": s3c, "s3_url": s3_url, "prefect": pf_server, "mlflow": ml_server}
    finally:
        for server in reversed(started):
            server.stop()


@pytest.fixture
def stack_env(stack, monkeypatch, tmp_path):
    """This process pointed at the stack, with a fresh shrinkflow home."""
    for key, value in stack["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path / "home"))
    return {**os.environ}
