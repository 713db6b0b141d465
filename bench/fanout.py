"""Fan-out overhead and speed-up: the same 8 digits variants three ways, median of 3 runs each.

    python bench/fanout.py

(a) a plain Python loop over the core functions (no Prefect, no MLflow);
(b) the flow with 1 worker (threads runner);
(c) the flow on a Dask LocalCluster of 2 worker processes.
All in one invocation, on embedded defaults, each run in a fresh home after a warm-up that
caches the teacher, so every timed run starts from the same state: a returning user's, with the
trained teacher cached and an MLflow database that exists (created once, empty). Each (c) run
starts its own forkserver and cluster, as a CLI run does. Writes the "fanout" section of
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import table, write_section  # noqa: E402

RUNS = 3


def recipes():
    from shrinkflow.workloads.digits import default_recipes

    keep = ("prune-global-60", "prune-channels-50", "kd-w50", "kd-w25-d67", "int8-dynamic", "int8-static",
            "fp16", "kd-w50+int8-static")
    return tuple(r for r in default_recipes() if r.name in keep)


def fresh_home(base: Path, seed_cache: Path | None, seed_db: Path | None = None) -> Path:
    home = Path(tempfile.mkdtemp(dir=base))
    if seed_cache is not None:  # the trained teacher, as a returning user has it
        shutil.copytree(seed_cache, home / "artifacts" / "cache" / "teachers")
    if seed_db is not None:  # MLflow's tables, created once (no runs, no experiments)
        shutil.copy(seed_db, home / "mlflow.db")
    os.environ["SHRINKFLOW_HOME"] = str(home)
    return home


def empty_mlflow_db(base: Path) -> Path:
    from mlflow.tracking import MlflowClient

    path = base / "empty-mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # creates and migrates the tables
    return path


def plain_loop(spec) -> float:
    from shrinkflow import pipeline, workloads
    from shrinkflow.cache import DirCache
    from shrinkflow.measure import threads

    t0 = time.perf_counter()
    cache = DirCache(Path(os.environ["SHRINKFLOW_HOME"]) / "artifacts" / "cache")
    with threads(1):  # the same single-threaded training the workers use
        pipeline.sweep(spec, cache=cache, workload=workloads.load(spec.workload, seed=spec.seed, cache=cache))
    return time.perf_counter() - t0


def flow(spec) -> tuple[float, int]:
    from flows.compress import run
    from flows.runners import stop_forkserver

    stop_forkserver()  # each run starts its own, as a CLI run does
    t0 = time.perf_counter()
    out = run(spec)
    return time.perf_counter() - t0, out.teacher_forward_samples


def main() -> int:
    for var in ("MLFLOW_TRACKING_URI", "SHRINKFLOW_ARTIFACT_STORE", "PREFECT_API_URL"):
        os.environ.pop(var, None)
    from shrinkflow.specs import SweepSpec
    from tasks.config import prepare_environment

    base = Path(tempfile.mkdtemp(prefix="fanout-"))
    home = fresh_home(base, None)
    prepare_environment()
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()  # one API for every flow run below, started once (not timed)
    server.start(timeout=120)
    os.environ["PREFECT_API_URL"] = server.api_url
    specs = {
        "a": SweepSpec(device="rpi4", recipes=recipes(), runner="threads", workers=1),
        "b": SweepSpec(device="rpi4", recipes=recipes(), runner="threads", workers=1),
        "c": SweepSpec(device="rpi4", recipes=recipes(), runner="dask", workers=2),
    }
    times: dict[str, list[float]] = {k: [] for k in specs}
    passes: list[int] = []
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            flow(specs["b"])  # warm-up: trains and caches the teacher
            teacher_cache = home / "artifacts" / "cache" / "teachers"
            mlflow_db = empty_mlflow_db(base)
            for i in range(RUNS):
                for key in ("a", "b", "c"):
                    fresh_home(base, teacher_cache, mlflow_db)
                    if key == "a":
                        times[key].append(plain_loop(specs[key]))
                    else:
                        secs, n = flow(specs[key])
                        times[key].append(secs)
                        passes.append(n)
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [[k, label, " / ".join(f"{t:.1f}" for t in times[k]), f"{med[k]:.1f}"] for k, label in
            (("a", "plain loop over the core"), ("b", "flow, 1 worker (threads)"), ("c", "flow, Dask LocalCluster, 2 worker processes"))]
    body = "\n".join([
        f"8 digits variants on `rpi4`, {RUNS} runs each, interleaved (a, b, c, a, b, c, ...); each run in a fresh home "
        "with the trained teacher cached and an empty MLflow database (tables created once), and nothing else: teacher "
        "outputs are computed in every run. The flow runs include MLflow tracking (embedded SQLite), model logging, "
        "promotion and the report; each (c) run starts its own forkserver and Dask cluster. The Prefect API is started "
        "once, outside the timings, as a Prefect server would be.",
        "",
        table(["", "run", f"wall s ({RUNS} runs)", "median s"], rows),
        "",
        f"(b)/(a) = {med['b'] / med['a']:.2f} (target <= 1.10: {'met' if med['b'] / med['a'] <= 1.10 else 'NOT met'}); "
        f"(b)/(c) = {med['b'] / med['c']:.2f} (target >= 1.7: {'met' if med['b'] / med['c'] >= 1.7 else 'NOT met'}).",
        f"Teacher forward passes per training sample, per flow run: {sorted(set(p / 1078 for p in passes))} "
        "(1078 training samples; one pass per sample, once per sweep).",
    ])
    write_section("fanout", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
