"""Where state lives. Embedded defaults need no server: everything goes under the shrinkflow home.

* home: ``$SHRINKFLOW_HOME`` or ``./.shrinkflow``
* MLflow: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<home>/mlflow.db`` (artifacts in ``<home>/mlartifacts``)
* search studies (Optuna): ``$SHRINKFLOW_SEARCH_STORAGE`` or ``sqlite:///<home>/search.db``
* artifact store: ``$SHRINKFLOW_ARTIFACT_STORE`` (``s3://bucket/prefix`` or a path) or ``<home>/artifacts``
* Prefect: ``$PREFECT_API_URL`` or Prefect's local mode, with its state in ``<home>/prefect``
"""

from __future__ import annotations

import os
from pathlib import Path

from shrinkflow.workloads import home

CHAMPION = "champion"


_DEFAULTED: set[str] = set()


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else SQLite under the home. mlflow.set_tracking_uri() exports the URI
    it is given into the environment, so a default exported that way is not taken for the user's."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and env not in _DEFAULTED:
        return env
    uri = f"sqlite:///{home() / 'mlflow.db'}"
    _DEFAULTED.add(uri)
    return uri


def local_tracking() -> bool:
    return tracking_uri().startswith("sqlite:")


def search_storage() -> str:
    """Where search studies live (an Optuna RDB URL): $SHRINKFLOW_SEARCH_STORAGE, else a SQLite file
    beside the embedded MLflow database. Optuna and MLflow both keep an ``alembic_version`` table,
    so one SQLite file cannot hold both; on PostgreSQL the stack gives the search a schema of
    MLflow's database (``?options=-csearch_path%3Doptuna``)."""
    env = os.environ.get("SHRINKFLOW_SEARCH_STORAGE")
    if env:
        return env
    uri = tracking_uri()
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else home()
    return f"sqlite:///{folder / 'search.db'}"


def mlflow_artifacts_root() -> Path:
    return home() / "mlartifacts"


def store_uri() -> str:
    return os.environ.get("SHRINKFLOW_ARTIFACT_STORE") or str(home() / "artifacts")


#: What keeps the libraries' console output to errors, in this process and in the worker processes
#: it starts (they inherit it); ``shrinkflow run -v`` leaves it out. Prefect still ships INFO logs
#: to its API (its loggers' levels are unchanged: only its console handler is raised).
QUIET_ENV = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "ERROR",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "DASK_LOGGING__DISTRIBUTED": "error",
    "TORCH_LOGS": "-all",  # torch's loggers at ERROR
    "KINETO_LOG_LEVEL": "6",  # torch profiler's native "profiler_start/stop" lines
    "PYTHONWARNINGS": "ignore",  # libraries' deprecation notices, in worker processes
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # its download bars
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # its "View run ... at" lines, one per run (the CLI links the sweep)
}


def prepare_environment(quiet: bool = False) -> None:
    """Defaults for Prefect's local mode (and, if ``quiet``, for quiet libraries); call before
    prefect is imported. Variables already set are left as they are."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")  # the same for Prefect's client (its first-run notice too)
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(home() / "prefect"))
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
        # Prefect's own default (20 s) for its local server to come up was missed 2 times in 10
        # on a 2-core host busy with other work; the server itself then came up in under a minute.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for key, value in (QUIET_ENV if quiet else {}).items():
        os.environ.setdefault(key, value)
