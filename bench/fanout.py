"""Fan-out overhead and speed-up: the same 8 digits variants three ways, median of 3 runs each.

    python bench/fanout.py            # 8 small digits variants (section "fanout")
    python bench/fanout.py --long     # 8 variants of about 20 s each, (b)-(d) only (section "fanout_long")
    python bench/fanout.py --long --scale 2   # the same, each epoch twice the split (section "fanout_long_x2")
    python bench/fanout.py --long --scale 2 --fresh   # each flow run in a fresh process ("fanout_long_x2_fresh")

With --long, the variants are 8 distillations of different widths (0.60 to 0.95 of the
teacher's, 80 epochs, no early stop, so the same work every run), the scale at which fanning out
is judged: 2 workers must reach at least 1.8x the one-worker flow.

(a) a plain Python loop over the core functions (no Prefect, no MLflow);
(b) the flow with 1 worker (threads runner);
(c) the flow on a Dask LocalCluster of 2 worker processes;
(d) the flow joined by address to a cluster already running: `dask scheduler` and 2
    `dask worker --nthreads 1 --no-nanny` processes, started once before the timings, as a
    team that runs sweeps repeatedly keeps one (each (d) run is a new sweep name and model, with
    the teacher outputs computed again).
All in one invocation (with --fresh, each flow run in a Python process of its own, as a CLI run
is: without it, the one-worker flow runs in a process that earlier runs have warmed up, which no
CLI run is), on embedded defaults, each run in a fresh home after a warm-up that
caches the teacher, so every timed run starts from the same state: a returning user's, with the
trained teacher cached and an MLflow database that exists (created once, empty). Each (c) run
starts its own cluster, as a CLI run does. Writes the "fanout" section of
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
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


def long_scale() -> int:
    """``--scale N`` (with --long): each distillation epoch draws N times the training split, 1 unless given."""
    args = sys.argv[1:]
    return int(args[args.index("--scale") + 1]) if "--scale" in args else 1


def long_recipes():
    from shrinkflow.specs import DistillSpec, Recipe

    x = long_scale()
    per_epoch = {"samples_per_epoch": x * 1078} if x > 1 else {}  # the digits training split: 1,078 samples
    return tuple(Recipe(name=f"kd-w{w}-e80" + (f"-x{x}" if x > 1 else ""),
                        steps=(DistillSpec(width=w / 100, epochs=80, patience=80, **per_epoch),))
    for w in range(60, 100, 5))


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


def standing_cluster(home: Path, api_url: str, workers: int = 2) -> tuple[str, list[subprocess.Popen]]:
    """`dask scheduler` and ``workers`` 1-thread workers, the way a cluster is joined (not timed).

    --no-nanny: a Nanny would start each worker with Dask's MALLOC_TRIM_THRESHOLD_=65536."""
    from distributed import Client

    from flows import runners

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "SHRINKFLOW_HOME": str(home), "PREFECT_API_URL": api_url, "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",  # as a cluster's workers are configured
           "SHRINKFLOW_ARTIFACT_STORE": str(home / "artifacts"),
           # the local cluster's worker settings (no profiler, slower housekeeping), by Dask's environment variables
           **{"DASK_" + key.upper().replace(".", "__").replace("-", "_"): str(value)
              for key, value in runners.WORKER_CONFIG.items()}}
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    dask = str(Path(sys.executable).parent / "dask")
    address = f"tcp://127.0.0.1:{port}"
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"], **quiet)]
    procs += [subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard", "--preload",
                                "tasks.compress", "--local-directory", str(home / "dask" / f"w{i}")], **quiet) for i in range(workers)]
    deadline = time.monotonic() + 180
    with Client(address, timeout=120) as client:
        while len(client.scheduler_info()["workers"]) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{workers} dask workers did not join {address} in 180 s")
            time.sleep(0.5)
    return address, procs


def standing_home(home: Path) -> None:
    """The standing cluster's home before a (d) run: the teacher cached, its outputs not."""
    os.environ["SHRINKFLOW_HOME"] = str(home)
    for entry in (home / "artifacts" / "cache").iterdir():
        if entry.name != "teachers":
            shutil.rmtree(entry)


def flow(spec, fresh: bool = False) -> tuple[float, int]:
    """One flow run's wall time (from the call of ``flows.compress.run`` to its return) and the
    teacher's forward samples; with ``fresh``, in a new Python process of its own, as a CLI run is
    (its imports done before the clock starts), so no run inherits what an earlier one warmed up
    in this process (torch's compiler and export machinery, Prefect's task engine, the workload)."""
    if fresh:
        # not the tracking URI that MLflow exported here for the warm-up's home: the run's own home decides it
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        out = subprocess.run([sys.executable, __file__, "--one", spec.model_dump_json()], env=env,
                             capture_output=True, text=True, check=False)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith(RESULT)), None)
        if out.returncode != 0 or line is None:
            raise RuntimeError(f"flow run {spec.name!r} in a fresh process exited {out.returncode}:\n{out.stderr[-3000:]}")
        wall, samples = json.loads(line[len(RESULT):])
        return wall, samples
    from flows.compress import run
    t0 = time.perf_counter()
    out = run(spec)
    return time.perf_counter() - t0, out.teacher_forward_samples


RESULT = "fanout-result: "


def one() -> int:
    """``--one SPEC_JSON``: run one flow in this process and print its wall time (see :func:`flow`)."""
    import flows.compress  # noqa: F401 - imported before the clock starts, as the CLI has it by then
    from shrinkflow.specs import SweepSpec

    spec = SweepSpec.model_validate_json(sys.argv[sys.argv.index("--one") + 1])
    print(RESULT + json.dumps(flow(spec)), flush=True)
    return 0


def main() -> int:
    if "--one" in sys.argv[1:]:
        return one()
    long = "--long" in sys.argv[1:]
    fresh = "--fresh" in sys.argv[1:]
    if fresh and not long:  # (a), the plain loop, has no flow to run apart, and "fanout" would not say so
        raise SystemExit("--fresh applies to --long only (the plain loop of the short comparison runs in this process)")
    recipes_ = long_recipes if long else recipes
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
        "a": SweepSpec(device="rpi4", recipes=recipes_(), runner="threads", workers=1),
        "b": SweepSpec(device="rpi4", recipes=recipes_(), runner="threads", workers=1),
        "c": SweepSpec(device="rpi4", recipes=recipes_(), runner="dask", workers=2),
    }
    keys = ("b", "c", "d") if long else ("a", "b", "c", "d")
    times: dict[str, list[float]] = {k: [] for k in keys}
    passes: list[int] = []
    cluster: list[subprocess.Popen] = []
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            warm = SweepSpec(device="rpi4", recipes=recipes()[4:5], runner="threads", workers=1) if long else specs["b"]
            flow(warm)  # warm-up: trains and caches the teacher
            teacher_cache = home / "artifacts" / "cache" / "teachers"
            mlflow_db = empty_mlflow_db(base)
            d_home = fresh_home(base, teacher_cache, mlflow_db)
            address, cluster = standing_cluster(d_home, server.api_url)
            for i in range(RUNS):
                for key in keys:
                    if key == "d":
                        standing_home(d_home)
                        secs, n = flow(SweepSpec(name=f"fanout-d{i}", registry_name=f"digits-rpi4-d{i}", device="rpi4",
                                                 recipes=recipes_(), runner="dask", workers=2, dask_address=address), fresh)
                        times[key].append(secs)
                        passes.append(n)
                        print(f"round {i + 1}: ({key}) {secs:.1f} s", flush=True)
                        continue
                    fresh_home(base, teacher_cache, mlflow_db)
                    if key == "a":
                        times[key].append(plain_loop(specs[key]))
                    else:
                        secs, n = flow(specs[key], fresh)
                        times[key].append(secs)
                        passes.append(n)
                        print(f"round {i + 1}: ({key}) {secs:.1f} s", flush=True)
    finally:
        for proc in cluster:
            proc.terminate()
        for proc in cluster:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # a worker still closing a minute after SIGTERM: the figures are kept
                print(f"standing worker {proc.pid} did not stop within 60 s of SIGTERM; killed", flush=True)
                proc.kill()
                proc.wait()
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    if long:
        return _report_long(times, med, fresh)
    rows = [[k, label, " / ".join(f"{t:.1f}" for t in times[k]), f"{med[k]:.1f}"] for k, label in
            (("a", "plain loop over the core"), ("b", "flow, 1 worker (threads)"), ("c", "flow, Dask LocalCluster, 2 worker processes"),
             ("d", "flow, joined by address to 2 running workers (--nthreads 1 --no-nanny)"))]
    body = "\n".join([
        f"8 digits variants on `rpi4`, {RUNS} runs each, interleaved (a, b, c, d, a, b, c, d, ...); each (a)-(c) run in a fresh home "
        "with the trained teacher cached and an empty MLflow database (tables created once), and nothing else: teacher "
        "outputs are computed in every run. The flow runs include MLflow tracking (embedded SQLite), model logging, "
        "promotion and the report; each (c) run starts its own Dask cluster. The Prefect API is started "
        "once, outside the timings, as a Prefect server would be; so is (d)'s cluster, whose runs share one home (teacher "
        "outputs deleted before each).",
        "",
        table(["", "run", f"wall s ({RUNS} runs)", "median s"], rows),
        "",
        f"(b)/(a) = {med['b'] / med['a']:.2f} (target <= 1.10: {'met' if med['b'] / med['a'] <= 1.10 else 'NOT met'}); "
        f"(b)/(c) = {med['b'] / med['c']:.2f} (target >= 1.7: {'met' if med['b'] / med['c'] >= 1.7 else 'NOT met'}); "
        f"(b)/(d) = {med['b'] / med['d']:.2f} (the same target, with the workers already running: "
        f"{'met' if med['b'] / med['d'] >= 1.7 else 'NOT met'}).",
        f"Teacher forward passes per training sample, per flow run: {sorted(set(p / 1078 for p in passes))} "
        "(1078 training samples; one pass per sample, once per sweep).",
    ])
    write_section("fanout", body)
    print(body)
    return 0


def _report_long(times: dict[str, list[float]], med: dict[str, float], fresh: bool) -> int:
    rows = [[k, label, " / ".join(f"{t:.1f}" for t in times[k]), f"{med[k]:.1f}"] for k, label in
            (("b", "flow, 1 worker (threads)"), ("c", "flow, Dask LocalCluster, 2 worker processes"),
             ("d", "flow, joined by address to 2 running workers (--nthreads 1 --no-nanny)"))]
    ok = {k: med["b"] / med[k] >= 1.8 for k in ("c", "d")}
    body = "\n".join([
        f"8 digits distillations of about {20 * long_scale()} s each (widths 0.60-0.95, 80 epochs of {long_scale()} x "
        f"the split, no early stop) on `rpi4`, {RUNS} runs "
        "each, interleaved (b, c, d, b, c, d, ...), set up as in the \"fanout\" section"
        + (", except that each flow run is a Python process of its own, as a CLI run is (the wall time runs from the "
           "call of `flows.compress.run` to its return, after the process's imports)." if fresh else "."),
        "",
        table(["", "run", f"wall s ({RUNS} runs)", "median s"], rows),
        "",
        f"(b)/(c) = {med['b'] / med['c']:.2f} (target >= 1.8: {'met' if ok['c'] else 'NOT met'}); "
        f"(b)/(d) = {med['b'] / med['d']:.2f} (target >= 1.8: {'met' if ok['d'] else 'NOT met'}).",
    ])
    write_section(("fanout_long" if long_scale() == 1 else f"fanout_long_x{long_scale()}") + ("_fresh" if fresh else ""), body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
