"""How long processes take to go away once their work is done: a worker, the CLI, a local cluster.

    python bench/exit.py               # 5 rounds (section "exit")
    python bench/exit.py --repeats 7

Exiting, CPython runs a full garbage collection over every object it tracks before it tears down
its modules. With torch, Prefect and MLflow imported and a variant trained, that is millions of
objects. ``gc.freeze()`` moves them out of the collector's reach, so the last collections skip
them; a Dask worker closing (``tasks.compress.dask_teardown``) and the ``shrinkflow`` command
returning (``flows.cli.entry``) both do it. Measured three ways, interleaved round by round:

1. **A process after a variant.** A fresh Python process imports ``tasks.compress`` (torch,
   Prefect, MLflow, the core), trains one small digits distillation (width 0.8, 2 epochs), prints
   the time, and exits: as it is, or after ``tasks.compress.dask_teardown`` (the freeze). The
   figure is the time from that line to the process's end, seen from its parent.
2. **A local cluster closing.** ``LocalCluster`` of 2 workers (1 thread each, as the flow starts
   it, Dask's malloc setting off), each worker training one such distillation, then
   ``client.close(); cluster.close()`` timed: the workers preloading ``tasks.compress`` (which
   freezes on teardown), or a preload that imports the same and does not.

The flow waits for its local cluster to close before it re-times its finalists, so that the
timings have the host's cores to themselves; what it waits for is row 2. Writes the "exit"
section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import sys, time
import tasks.compress
from shrinkflow import pipeline, workloads
from shrinkflow.cache import DirCache
from shrinkflow.measure import threads
from shrinkflow.specs import DistillSpec, Recipe
cache = DirCache(sys.argv[1])
ctx = pipeline.context(workloads.load("digits", 0, cache), cache, 0)
if sys.argv[2] != "prepare":  # the teacher and its outputs only: the cache every timed run copies
    with threads(1):
        pipeline.build(ctx, Recipe(name="kd-w80-e2", steps=(DistillSpec(width=0.8, epochs=2, patience=2),)))
if sys.argv[2] == "freeze":
    tasks.compress.dask_teardown(None)
print(f"done {time.time():.6f}", flush=True)
"""

#: A worker preload that imports what ``tasks.compress`` does and readies the profiler, without its teardown.
PLAIN_PRELOAD = """
import tasks.compress
def dask_setup(worker):
    tasks.compress.ready_profiler()
"""

CLUSTER = """
import json, logging, sys, time
import dask
from distributed import Client, LocalCluster
from flows import runners

def train(cache):
    from shrinkflow import pipeline, workloads
    from shrinkflow.cache import DirCache
    from shrinkflow.measure import threads
    from shrinkflow.specs import DistillSpec, Recipe
    c = DirCache(cache)
    ctx = pipeline.context(workloads.load("digits", 0, c), c, 0)
    with threads(1):
        pipeline.build(ctx, Recipe(name="kd-w80-e2", steps=(DistillSpec(width=0.8, epochs=2, patience=2),)))
    return 1

if __name__ == "__main__":
    preload = sys.argv[2]
    with dask.config.set({**runners.CLUSTER_CONFIG, **runners.HOUSEKEEPING}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR, preload=[preload], config=runners.WORKER_CONFIG)
        client = Client(cluster)
        client.gather([client.submit(train, c, pure=False) for c in sys.argv[3:5]])
        t0 = time.perf_counter()
        client.close()
        cluster.close()
        print(json.dumps({"close_s": time.perf_counter() - t0}), flush=True)
"""


def _copy(base: Path) -> str:
    """A fresh copy of the prepared cache: the student is trained, not read back from it."""
    return shutil.copytree(base, tempfile.mkdtemp(prefix="run-", dir=base.parent), dirs_exist_ok=True)


def _after_done(mode: str, cache: str) -> float:
    """Seconds from the child's last line to its exit."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, cache, mode], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    done = None
    for line in proc.stdout:
        if line.startswith("done "):
            done = float(line.split()[1])
    proc.wait()
    end = time.time()
    if proc.returncode != 0 or done is None:
        raise SystemExit(f"child ({mode}) failed with exit {proc.returncode}")
    return end - done


def _close(preload: str, base: Path, work: Path) -> float:
    out = subprocess.run([sys.executable, str(work / "cluster.py"), "-", preload, _copy(base), _copy(base)], cwd=ROOT, capture_output=True,
                         text=True, env=_env(work))
    if out.returncode != 0:
        raise SystemExit(f"cluster run ({preload}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["close_s"]


def _env(work: Path) -> dict:
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(work), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="exit-") as tmp:
        work = Path(tmp)
        (work / "plain_preload.py").write_text(PLAIN_PRELOAD)
        (work / "cluster.py").write_text(CLUSTER)
        base = work / "base"
        _after_done("prepare", str(base))  # trains and caches the teacher and its outputs once (untimed)
        runs: dict[str, list[float]] = {k: [] for k in ("plain", "freeze", "close_plain", "close_freeze")}
        for _ in range(args.repeats):  # interleaved, so a busy moment does not fall on one kind only
            runs["plain"].append(_after_done("plain", _copy(base)))
            runs["freeze"].append(_after_done("freeze", _copy(base)))
            runs["close_plain"].append(_close("plain_preload", base, work))
            runs["close_freeze"].append(_close("tasks.compress", base, work))
    med = {k: statistics.median(v) for k, v in runs.items()}
    labels = {"plain": "process exit after a variant, as it is (s)",
              "freeze": "process exit after a variant, objects frozen first (s)",
              "close_plain": "local cluster close, 2 workers, no freeze on teardown (s)",
              "close_freeze": "local cluster close, 2 workers, `tasks.compress` preload: freeze on teardown (s)"}
    rows = [[labels[k], " / ".join(f"{x:.2f}" for x in v), f"{med[k]:.2f}"] for k, v in runs.items()]
    body = "\n".join([
        __doc__.split("\n\n", 2)[2].rsplit("\n\nThe flow waits", 1)[0].strip(), "",
        f"Medians of {args.repeats}, interleaved.", "",
        table(["run", f"seconds ({args.repeats} runs)", "median"], rows), "",
        f"Exit after a variant: **{med['plain'] / med['freeze']:.1f}x** faster frozen "
        f"({med['plain']:.2f} s -> {med['freeze']:.2f} s); a local cluster's close: "
        f"**{med['close_plain'] / med['close_freeze']:.1f}x** ({med['close_plain']:.2f} s -> {med['close_freeze']:.2f} s)."])
    write_section("exit", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
