"""Re-timing a sweep's finalists on a worker of its cluster, against a fresh process.

    python bench/retime.py [--rounds 3] [--trials 8]

Before the winner is chosen, the finalists whose latency can decide something, the likely winner
and runner-up and the teacher are timed again together in one process (README, "latency"). The
flow runs that as a task on its variant runner: one worker of the local cluster, which has the
finalists' runtimes loaded. The process that ran it before was the flow's own, which had never
loaded an ExecuTorch program. Each round here:

1. **worker**: a digits search on `rpi4` (``--trials`` trials, seed 0, a local Dask cluster of 2
   workers, a fresh shrinkflow home with the trained teacher copied in), whose space holds
   ExecuTorch (XNNPACK) programs beside torch ones. Its ``retime_s`` timing: from the last
   variant in to the re-timed results back in the flow.
2. **fresh process**: the same re-timing (``tasks.compress.retime_task``, inside a flow run of its
   own) of that sweep's results, in a new Python process that has imported ``flows.compress`` and
   loaded the workload, as the flow's process had (its teacher task loads it). Timed from the
   task's call to its return, so the process's imports, the workload's loading and the flow
   run's start are outside it. It re-times the sweep's results as re-timed by the worker, so it
   may pick other finalists than the worker did; the table gives how many programs each timed.

Both time the same programs, so the re-timed p50s (normalised, as judged) should agree within
what the host moves between the two. Writes the "retime" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _report import table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def cold_retime(state: Path) -> None:
    """In a fresh process: re-time the pickled sweep's results as the flow's process did, then
    write back the seconds the task took and the re-timed p50s."""
    from prefect import flow

    import flows.compress  # noqa: F401 - the flow's process had it imported
    from tasks.compress import context, retime_task
    from tasks.config import prepare_environment

    prepare_environment(quiet=True)
    spec, teacher, results = pickle.loads(state.read_bytes())
    context(**spec.workload_args())  # loaded by the flow's teacher task, before the variants

    @flow(name="bench-retime")
    def retime_in_this_process():
        t0 = time.perf_counter()
        new_teacher, new_results = retime_task(spec, teacher, results)
        return time.perf_counter() - t0, p50s(new_teacher, new_results)

    state.write_bytes(pickle.dumps(retime_in_this_process()))


def p50s(teacher, results) -> dict[str, tuple[float, str]]:
    """Re-timed programs (30 interleaved calls): name -> (normalised p50 ms, artifact format)."""
    return {r.name: (r.report.latency_p50_ms, r.report.artifact_format) for r in (teacher, *results)
            if r.report is not None and r.report.latency_runs == 30}


def one_round(seed_home: Path, trials: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix="sf-retime-"))
    shutil.copytree(seed_home / "cache", home / "cache")
    os.environ["SHRINKFLOW_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from flows.compress import run
    from shrinkflow.specs import SweepSpec, parse

    spec = parse(SweepSpec, {"name": "bench-retime", "workload": "digits", "device": "rpi4", "runner": "dask",
                             "workers": 2, "search": {"trials": trials}})
    out = run(spec)
    worker = {"seconds": out.timings["retime_s"], "p50": p50s(out.teacher, out.variants)}
    state = home / "retime.pkl"
    state.write_bytes(pickle.dumps((spec, out.teacher, list(out.variants))))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, __file__, "--cold", str(state)], check=True, env=env, cwd=ROOT)
    seconds, p50 = pickle.loads(state.read_bytes())
    shutil.rmtree(home, ignore_errors=True)
    return {"worker": worker, "fresh": {"seconds": seconds, "p50": p50}, "flow_s": out.timings["flow_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--cold", type=Path, help=argparse.SUPPRESS)  # the fresh process of a round
    args = ap.parse_args()
    if args.cold:
        cold_retime(args.cold)
        return
    from tasks.config import prepare_environment

    prepare_environment(quiet=True)
    seed_home = Path(tempfile.mkdtemp(prefix="sf-retime-seed-"))
    os.environ["SHRINKFLOW_HOME"] = str(seed_home)
    from shrinkflow import workloads

    workloads.load("digits", seed=0)  # trains (once) and caches the teacher under the seed home
    rounds = []
    for i in range(args.rounds):
        rounds.append(one_round(seed_home, args.trials))
        r = rounds[-1]
        print(f"round {i + 1}: worker {r['worker']['seconds']:.2f} s, fresh process {r['fresh']['seconds']:.2f} s",
              flush=True)
    shutil.rmtree(seed_home, ignore_errors=True)

    med = {where: statistics.median(r[where]["seconds"] for r in rounds) for where in ("worker", "fresh")}
    rows = [[i + 1, f"{r['worker']['seconds']:.2f}", f"{r['fresh']['seconds']:.2f}",
             f"{len(r['worker']['p50'])} / {len(r['fresh']['p50'])}", f"{r['flow_s']:.1f}",
             ", ".join(sorted({fmt for _, fmt in r["worker"]["p50"].values()}))] for i, r in enumerate(rounds)]
    rows.append(["median", f"{med['worker']:.2f}", f"{med['fresh']:.2f}", "", "", ""])
    names = sorted(set.intersection(*(set(r["worker"]["p50"]) & set(r["fresh"]["p50"]) for r in rounds)))
    figures = [[f"`{n}`", rounds[0]["worker"]["p50"][n][1],
                " / ".join(f"{r['worker']['p50'][n][0]:.3f}" for r in rounds),
                " / ".join(f"{r['fresh']['p50'][n][0]:.3f}" for r in rounds),
                f"{statistics.median(r['fresh']['p50'][n][0] / r['worker']['p50'][n][0] for r in rounds):.2f}"]
               for n in names]
    body = [__doc__.split("\n\n", 2)[2].strip(), "",
            table(["round", "re-timing on a worker (s)", "in a fresh process (s)", "programs timed (worker / fresh)",
                   "the search flow (s)",
                   "formats re-timed"], rows), "",
            f"Fresh process / worker: **{med['fresh'] / med['worker']:.1f}x** (medians of {len(rounds)}).", "",
            "The same programs' re-timed p50 (ms, normalised), round by round:", "",
            table(["program", "format", "worker", "fresh process", "fresh / worker (median)"], figures)]
    write_section("retime", "\n".join(body))


if __name__ == "__main__":
    main()
