"""Faults against real servers: racing promotions, S3 stopped mid-promotion, MLflow restarted
mid-sweep, a Dask worker killed mid-variant, a corrupt teacher in the store.

The faults are real (a server stops, a process is killed); where the moment matters, the test
picks it by wrapping one store call, so that each run exercises the same step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from mlflow import MlflowClient
from prefect import flow

from shrinkflow import budget
from shrinkflow.specs import SweepSpec, parse
from tests.integration import servers
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration

WIDTHS = (25, 50, 100)


def _spec(name, workload="tests.unit.plugin_workload:make", **kw):
    recipes = kw.pop("recipes", [{"name": f"kd-w{w}", "steps": [{"kind": "distill", "width": w / 100, "epochs": 4}]}
                                 for w in WIDTHS])
    return parse(SweepSpec, {"name": name, "workload": workload, "device": "rpi4", "runner": "threads",
                             "budget": {"max_quality_drop": 1.0}, "recipes": recipes, **kw})


def _children(client, exp_name, parent_run_id):
    exp = client.get_experiment_by_name(exp_name)
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("mlflow.parentRunId") == parent_run_id]


def _ranked(outcome):
    """Variants from worst to best in promotion order (quality, then smaller size)."""
    return sorted(outcome.variants, key=lambda v: (v.report.quality, -v.report.size_bytes))


@flow(name="promote-winner")
def promote_winner(spec: SweepSpec, name: str, winner):
    from tasks.promote import promote_task

    _, limits = budget.resolve(spec.device, spec.budget)
    return promote_task(spec, name, winner, limits, "test")


def _state(name):
    """(store pointer version, MLflow alias version) of a model."""
    from tasks import config, promote, storage

    pointer = storage.read_pointer(storage.open_store(config.store_uri()), name)
    alias = promote._champion(name)
    return (pointer or {}).get("version"), (str(alias.version) if alias else None)


def test_racing_promotions_end_with_one_champion_in_both_places(stack, stack_env, monkeypatch):
    from flows.compress import run
    from flows.promote import PromoteRequest, promote_flow
    from tasks import storage

    spec = _spec("race", registry_name="race-model")
    outcome = run(spec)
    weak, mid, strong = _ranked(outcome)
    assert outcome.promotion.promoted and _state("race-model") == (outcome.promotion.version,) * 2

    # make the weakest the champion (registered, rejected, then rolled back to by hand)
    weak_v = promote_winner(spec, "race-model", weak).version
    assert promote_flow(PromoteRequest(model="race-model", version=int(weak_v), rollback=True)).promoted
    assert _state("race-model") == (weak_v, weak_v)

    # two promotions read the same pointer before either writes: one compare-and-swap must lose
    gate, lock, calls, conflicts = threading.Barrier(2, timeout=120), threading.Lock(), [0], []
    real_read, real_swap = storage.read_pointer_tagged, storage.swap_pointer

    def read_gated(store, model):
        found = real_read(store, model)
        with lock:
            calls[0] += 1
            first_two = calls[0] <= 2
        if first_two:
            gate.wait()
        return found

    def swap_counted(*args):
        try:
            return real_swap(*args)
        except storage.Conflict:
            conflicts.append(threading.current_thread().name)
            raise

    monkeypatch.setattr(storage, "read_pointer_tagged", read_gated)
    monkeypatch.setattr(storage, "swap_pointer", swap_counted)
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(promote_winner, spec, "race-model", mid), pool.submit(promote_winner, spec, "race-model", strong)
        mid_out, strong_out = a.result(timeout=600), b.result(timeout=600)

    assert len(conflicts) == 1  # exactly one compare-and-swap lost, and that promotion compared again
    assert strong_out.promoted  # the better model wins whichever swapped first
    pointer_v, alias_v = _state("race-model")
    assert pointer_v == alias_v == strong_out.version  # one champion, the same in the store and in MLflow
    client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    assert client.get_model_version("race-model", strong_out.version).tags["promotion"] == "accepted"
    if not mid_out.promoted:
        assert "concurrent promotion" in mid_out.reason or "not beaten" in mid_out.reason

    # re-running the same promotion is a no-op: no new version, the pointer object is untouched
    from tasks import config

    store = storage.open_store(config.store_uri())
    before = real_read(store, "race-model")[1]
    versions = len(client.search_model_versions("name='race-model'"))
    again = promote_winner(spec, "race-model", strong)
    assert again.promoted and again.reason == "already the champion" and again.version == strong_out.version
    assert real_read(store, "race-model")[1] == before
    assert len(client.search_model_versions("name='race-model'")) == versions


@pytest.fixture
def store_s3(stack_env, monkeypatch):
    """The artifact store on its own S3 endpoint (moto's server mode), so the test can stop it and
    start it again on the same port with the same objects."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=servers.free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    import boto3

    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    s3.create_bucket(Bucket="fault-store")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url)
    monkeypatch.setenv("SHRINKFLOW_ARTIFACT_STORE", "s3://fault-store/models")
    state = {"server": server, "port": port, "s3": s3}

    def restart():
        state["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        state["server"].start()

    state["restart"] = restart
    yield state
    state["server"].stop()


def test_s3_stopped_mid_promotion_moves_nothing_and_a_rerun_completes(stack, stack_env, store_s3, monkeypatch):
    from flows.compress import run
    from flows.promote import PromoteRequest, promote_flow
    from tasks import storage

    spec = _spec("s3-fault", registry_name="s3-fault-model")
    outcome = run(spec)
    other = next(v for v in _ranked(outcome) if v.name != outcome.selection.winner)
    second = promote_winner(spec, "s3-fault-model", other)  # registered; kept out unless it beats the winner
    champion, other_v = ((second.version, outcome.promotion.version) if second.promoted
                         else (outcome.promotion.version, second.version))
    assert _state("s3-fault-model") == (champion, champion)
    s3 = store_s3["s3"]
    pointer_before = s3.get_object(Bucket="fault-store", Key="models/s3-fault-model/champion.json")["Body"].read()

    real_put_if = storage.S3Store.put_if

    def stop_before_manifest(self, key, data, etag):
        if key.endswith("manifest.json") and store_s3["server"] is not None:
            store_s3["server"].stop()  # the S3 server goes away after the files, before the manifest
            store_s3["server"] = None
        return real_put_if(self, key, data, etag)

    monkeypatch.setattr(storage.S3Store, "put_if", stop_before_manifest)
    state = promote_flow(PromoteRequest(model="s3-fault-model", version=int(other_v), rollback=True), return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert f"S3 endpoint http://127.0.0.1:{store_s3['port']} failed while trying to" in str(error), error

    store_s3["restart"]()
    monkeypatch.setattr(storage.S3Store, "put_if", real_put_if)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="fault-store", Prefix=f"models/s3-fault-model/v{other_v}/").get("Contents", [])}
    assert f"models/s3-fault-model/v{other_v}/manifest.json" not in keys  # no manifest
    assert s3.get_object(Bucket="fault-store", Key="models/s3-fault-model/champion.json")["Body"].read() == pointer_before
    assert _state("s3-fault-model") == (champion, champion)  # the alias did not move either

    done = promote_flow(PromoteRequest(model="s3-fault-model", version=int(other_v), rollback=True))
    assert done.promoted and _state("s3-fault-model") == (other_v, other_v)
    manifest, files = storage.fetch_verified(storage.open_store("s3://fault-store/models"),
                                             f"s3-fault-model/v{other_v}/manifest.json")
    assert manifest["registry_version"] == other_v and "model.pt2.xz" in files


def test_mlflow_restarted_mid_sweep_loses_and_duplicates_nothing(stack, stack_env, tmp_path):
    db = tmp_path / "mlflow.db"
    env = {**stack_env}
    ml_env = {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL")}
    server, url = servers.mlflow(tmp_path, f"sqlite:///{db}", "s3://mlflow-artifacts", ml_env)
    port = url.rsplit(":", 1)[1]
    env["MLFLOW_TRACKING_URI"] = url
    recipes = [{"name": f"kd-w{w}-e{e}", "steps": [{"kind": "distill", "width": w / 100, "epochs": e}]}
               for w in (25, 50, 75, 100) for e in (2, 4)]
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(json.dumps({"name": "mlflow-restart", "workload": "tests.unit.plugin_workload:large",
                                     "device": "rpi4", "runner": "threads", "budget": {"max_quality_drop": 1.0},
                                     "recipes": recipes}))
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(spec_path)], env={**env, "PYTHONPATH": str(ROOT)},
                            cwd=tmp_path, stdout=(tmp_path / "run.log").open("w"), stderr=subprocess.STDOUT)
    client = MlflowClient(url)
    try:
        deadline = time.monotonic() + 300
        while True:  # wait until the sweep is logging variants, then restart the server under it
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-3000:]
            exp = client.get_experiment_by_name("mlflow-restart")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if sum(r.data.tags.get("role") == "variant" for r in runs) >= 2:
                break
            time.sleep(0.3)
        server.stop()
        assert proc.poll() is None  # the sweep is still going, with variants left to log
        logged_before = sum(r.data.tags.get("role") == "variant" and r.info.status == "FINISHED" for r in runs)
        assert logged_before < len(recipes)
        time.sleep(5)  # the sweep keeps running with no tracking server
        server, _ = servers.mlflow(tmp_path, f"sqlite:///{db}", "s3://mlflow-artifacts", ml_env, port=int(port))
        assert proc.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-4000:]

        exp = client.get_experiment_by_name("mlflow-restart")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        parent = next(r for r in runs if r.data.tags.get("role") == "sweep")
        names = [r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(names) == sorted(["teacher"] + [r["name"] for r in recipes])  # exactly one child run each
        assert all(r.info.status == "FINISHED" for r in runs)
        assert client.get_model_version_by_alias("plugin-large-rpi4", "champion")
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()


def test_dask_worker_killed_mid_variant_is_rerun_without_a_duplicate_run(stack, stack_env, dask_cluster):
    from flows.compress import run

    recipes = [{"name": f"kd-w{w}", "steps": [{"kind": "distill", "width": w / 100, "epochs": 8}]} for w in (25, 50, 75, 100)]
    spec = _spec("worker-kill", workload="tests.unit.plugin_workload:large", recipes=recipes, runner="dask",
                 dask_address=dask_cluster, workers=2)
    client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    killed = {}

    def kill_one():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            exp = client.get_experiment_by_name("worker-kill")
            for r in client.search_runs([exp.experiment_id]) if exp else []:
                if r.data.tags.get("role") == "variant" and r.info.status == "RUNNING":
                    time.sleep(1.0)  # well inside its training
                    pid = int(r.data.tags["host_pid"].rsplit(":", 1)[1])
                    os.kill(pid, signal.SIGKILL)
                    killed.update(run_id=r.info.run_id, name=r.info.run_name, pid=pid)
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one)
    killer.start()
    outcome = run(spec)
    killer.join()
    assert killed, "no variant was seen running"
    children = _children(client, "worker-kill", outcome.parent_run_id)
    names = [r.info.run_name for r in children]
    assert sorted(names) == sorted(["teacher"] + [r["name"] for r in recipes])  # no duplicate child run
    rerun = next(r for r in children if r.info.run_id == killed["run_id"])
    assert rerun.info.status == "FINISHED" and "quality" in rerun.data.metrics
    assert not rerun.data.tags["host_pid"].endswith(f":{killed['pid']}")  # finished by another process
    assert all(not v.skipped for v in outcome.variants)


def test_corrupt_teacher_in_the_store_fails_clearly_and_promotes_nothing(stack, stack_env, tmp_path):
    from shrinkflow.cache import seal

    s3 = stack["s3"]
    from shrinkflow.workloads import digits

    key = f"corrupt/cache/teachers/digits-v{digits.ARCH_VERSION}-seed7.pt"
    s3.put_object(Bucket="shrinkflow-store", Key=key, Body=seal(b"x" * 4096)[:-50])  # truncated
    env = {**stack_env, "SHRINKFLOW_ARTIFACT_STORE": "s3://shrinkflow-store/corrupt"}
    spec = {"name": "corrupt-teacher", "workload": "digits", "device": "rpi4", "seed": 7, "runner": "threads",
            "registry_name": "corrupt-teacher-model",
            "recipes": [{"name": "int8", "steps": [{"kind": "quantize", "scheme": "int8-dynamic"}]}]}
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(tmp_path / "spec.yaml")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert f"teachers/digits-v{digits.ARCH_VERSION}-seed7.pt' is corrupt or truncated" in proc.stderr, proc.stderr[-3000:]
    client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    assert not client.search_model_versions("name='corrupt-teacher-model'")
    listed = s3.list_objects_v2(Bucket="shrinkflow-store", Prefix="corrupt/corrupt-teacher-model/")
    assert listed.get("KeyCount", 0) == 0
