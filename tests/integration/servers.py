"""Real servers on loopback for the integration tests: moto's S3, a Prefect API, an MLflow server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A subprocess polled until ``health_url`` answers 200; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], health_url: str, log_dir: Path, env: dict | None = None,
                 timeout: float = 90.0) -> None:
        self.name, self.health_url = name, health_url
        self.log = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(argv, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode} before it was healthy:\n{self.tail()}")
            if self.healthy():
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{name} was not healthy at {health_url} within {timeout:.0f}s:\n{self.tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.health_url, timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


def moto(log_dir: Path) -> tuple[Server, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return Server("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], url + "/moto-api/", log_dir), url


def prefect(log_dir: Path, home: Path, env: dict | None = None) -> tuple[Server, str]:
    port = free_port()
    env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           **(env or {})}
    env.pop("PREFECT_API_URL", None)
    argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}/api"
    return Server("prefect", argv, url + "/health", log_dir, env=env, timeout=120), url


def mlflow(log_dir: Path, backend_uri: str, artifacts: str, env: dict, port: int | None = None) -> tuple[Server, str]:
    port = port or free_port()
    argv = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts,
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    # No job runner: its ~7 huey consumer processes serve GenAI jobs (judges, trace rollups) that
    # tracking and the registry never use, and cost seconds of CPU and ~1 GB at every start.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **env}
    return Server("mlflow", argv, url + "/health", log_dir, env=env, timeout=120), url


def require(binary: str) -> None:
    if not (BIN / binary).exists() and shutil.which(binary) is None:
        raise RuntimeError(f"{binary!r} is not installed in this environment; run the README's test command (make test).")


def postgres(sql: str) -> None:
    """Run one statement as postgres on the machine's PostgreSQL (127.0.0.1:5432, trust auth)."""
    import psycopg2

    try:
        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=5)
    except psycopg2.OperationalError as exc:
        raise RuntimeError(f"PostgreSQL is not reachable at 127.0.0.1:5432 as user postgres ({exc}); "
                           "these tests need the machine's PostgreSQL running.") from None
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()
