"""Session fixtures: one S3 endpoint (moto server mode), one Prefect API server and one MLflow server,
both on PostgreSQL, and the digits teacher seeded into artifact stores."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration import servers

ROOT = Path(__file__).resolve().parents[2]
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


PG = "postgres@127.0.0.1:5432"


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """Starts the three servers (Prefect and MLflow in parallel, both on fresh PostgreSQL databases,
    dropped afterwards) and yields the environment a client needs to reach them."""
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
    tag = uuid.uuid4().hex[:8]
    dbs = {"prefect": f"sf_prefect_{tag}", "mlflow": f"sf_mlflow_{tag}"}
    try:
        for db in dbs.values():
            servers.postgres(f"CREATE DATABASE {db}")
        with ThreadPoolExecutor(2) as pool:
            pf = pool.submit(servers.prefect, logs, tmp_path_factory.mktemp("prefect-home"), {
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{PG}/{dbs['prefect']}",
                "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"})  # schedules show up within seconds
            ml = pool.submit(servers.mlflow, logs, f"postgresql+psycopg2://{PG}/{dbs['mlflow']}", "s3://mlflow-artifacts",
                             mlflow_env)
            (pf_server, pf_url), (ml_server, ml_url) = pf.result(), ml.result()
        started += [pf_server, ml_server]
        env = {**AWS, "PREFECT_API_URL": pf_url, "MLFLOW_TRACKING_URI": ml_url, "AWS_ENDPOINT_URL_S3": s3_url,
               "MLFLOW_S3_ENDPOINT_URL": s3_url, "SHRINKFLOW_ARTIFACT_STORE": "s3://shrinkflow-store/models",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               # Search studies in MLflow's PostgreSQL database, in a schema of their own (as the stack does).
               "SHRINKFLOW_SEARCH_STORAGE": f"postgresql+psycopg2://{PG}/{dbs['mlflow']}?options=-csearch_path%3Doptuna"}
        yield {"env": env, "s3": s3c, "s3_url": s3_url, "prefect": pf_server, "mlflow": ml_server,
               "mlflow_backend": f"postgresql+psycopg2://{PG}/{dbs['mlflow']}"}
    finally:
        for server in reversed(started):
            server.stop()
        for db in dbs.values():
            servers.postgres(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


@pytest.fixture
def stack_env(stack, monkeypatch, tmp_path):
    """This process pointed at the stack, with a fresh shrinkflow home."""
    for key, value in stack["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path / "home"))
    return {**os.environ}


def seed_digits_teacher(teacher, env: dict, store_uri: str) -> None:
    """Put the session's trained digits teacher into the artifact store at ``store_uri``, reached with
    ``env``'s endpoint and keys, where a first sweep would have cached it (create-if-absent)."""
    from tasks import storage

    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"):
            mp.setenv(key, env[key])
        teacher.seed(storage.StoreCache(storage.open_store(store_uri)))


@pytest.fixture
def digits_in_store(stack_env, digits_teacher):
    """The stack's artifact store (as ``stack_env`` names it) already holding the digits teacher:
    for tests of what a sweep does with a teacher, not of training one."""
    seed_digits_teacher(digits_teacher, stack_env, stack_env["SHRINKFLOW_ARTIFACT_STORE"])
    return stack_env


@pytest.fixture
def dask_cluster(tmp_path, stack_env, monkeypatch):
    """`dask scheduler` and two `dask worker` processes, started the way a cluster is joined.

    The workers and this process share an artifact store prefix of their own, so nothing cached
    by an earlier test (teacher outputs) is reused.
    """
    port = servers.free_port()
    monkeypatch.setenv("SHRINKFLOW_ARTIFACT_STORE", f"s3://shrinkflow-store/cluster-{uuid.uuid4().hex[:8]}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bin_dir = Path(sys.executable).parent
    procs = [subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0"], env=env, cwd=ROOT, stdout=(tmp_path / "sched.log").open("wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)]
    address = f"tcp://127.0.0.1:{port}"
    for i in range(2):
        procs.append(subprocess.Popen([str(bin_dir / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1",
                                       "--no-dashboard", "--local-directory", str(tmp_path / f"w{i}")], env=env, cwd=ROOT,
                                      stdout=(tmp_path / f"worker{i}.log").open("wb"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
    from distributed import Client

    deadline = time.monotonic() + 90
    with Client(address, timeout=60) as client:
        while len(client.scheduler_info()["workers"]) < 2:
            assert time.monotonic() < deadline, (tmp_path / "worker0.log").read_text()[-2000:]
            time.sleep(0.5)
    yield address
    for p in procs:
        os.killpg(p.pid, 15)
    for p in procs:
        p.wait(timeout=30)
