"""`shrinkflow stack up | status | down` on loopback: SeaweedFS, MLflow, Prefect, a worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def sf(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def _free_base() -> int:
    """A base port below the ephemeral range with base..base+5 and their SeaweedFS gRPC ports
    (+10000) all free, so no connection of another process can take one meanwhile."""
    import random
    import socket

    for _ in range(200):
        base = random.randrange(18000, 22000)
        try:
            socks = []
            for port in [base + i for i in range(6)] + [base + 10000 + i for i in range(6)]:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of ports for the stack")


#: The stack's S3 server honours conditional writes, which promotions rely on for the pointer.
CAS_CHECK = """
from tasks import config, storage
store = storage.open_store(config.store_uri())
body, etag = store.read("digits-phone/champion.json")
for expected in (None, '"0123456789abcdef0123456789abcdef"'):
    try:
        storage.swap_pointer(store, "digits-phone", body, expected)
        print("applied")
    except storage.Conflict:
        print("refused")
storage.swap_pointer(store, "digits-phone", body, etag)
print("moved")
"""


def test_stack_up_run_pull_down(tmp_path):
    base = _free_base()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "SHRINKFLOW_"))}
    env |= {"SHRINKFLOW_HOME": str(tmp_path / "home"), "SHRINKFLOW_STACK_BASE_PORT": str(base),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    up = sf(["stack", "up"], env, tmp_path)
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        exports = dict(line.strip().removeprefix("export ").split("=", 1) for line in up.stdout.splitlines()
                       if line.strip().startswith("export "))
        assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{base + 1}"
        state = json.loads((tmp_path / "home" / "stack" / "state.json").read_text())
        pids = {k: v["pid"] for k, v in state.items() if k != "env"}
        assert set(pids) == {"s3", "prefect", "mlflow", "worker"}

        again = sf(["stack", "up"], env, tmp_path)  # idempotent: nothing restarted
        assert again.returncode == 0
        state = json.loads((tmp_path / "home" / "stack" / "state.json").read_text())
        assert {k: v["pid"] for k, v in state.items() if k != "env"} == pids
        assert sf(["stack", "status"], env, tmp_path).returncode == 0

        client = {**env, **exports}
        spec = tmp_path / "spec.yaml"
        spec.write_text("name: stack\ndevice: phone\nrunner: threads\nbudget: {max_quality_drop: 1.0}\nrecipes:\n"
                        "  - name: kd-w25\n    steps: [{kind: distill, width: 0.25, epochs: 5}]\n")
        run = sf(["run", str(spec)], client, tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "s3://shrinkflow/models/digits-phone/v1/manifest.json" in run.stdout
        pulled = sf(["pull", "--device", "phone", "--out", str(tmp_path / "pulled")], client, tmp_path)
        assert pulled.returncode == 0, pulled.stderr[-2000:]
        assert json.loads((tmp_path / "pulled" / "manifest.json").read_text())["registry_name"] == "digits-phone"
        cas = subprocess.run([sys.executable, "-c", CAS_CHECK], env=client, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert cas.returncode == 0 and cas.stdout.split() == ["refused", "refused", "moved"], cas.stdout + cas.stderr[-2000:]
    finally:
        down = sf(["stack", "down"], env, tmp_path)
    assert down.returncode == 0 and "stopped: worker, mlflow, prefect, s3" in down.stdout
    for pid in pids.values():
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert (tmp_path / "home" / "stack" / "mlflow.db").exists() and (tmp_path / "home" / "stack" / "s3").exists()
    assert sf(["stack", "status"], env, tmp_path).returncode == 1
