"""Verdicts that load cannot flip: the same sweep unloaded and with a CPU burner, in one invocation.

    python bench/load.py [--workload digits] [--device rpi4] [--runner dask] [--workload-recipes]

(1) A calibration run, unloaded, with no latency limit: the variants' latencies. (2) The sweep
with ``max_latency_ms`` set between two of the middle variants, where their latencies are
furthest apart, so the limit splits the variants and the latency verdict matters, unloaded. (3) The same sweep while a CPU burner (a busy loop pinned
with ``taskset`` to the last core) runs for its whole duration. Runs (2) and (3) use one home
(the host calibration and the trained prefixes carry over, as for a returning user) and differ
in their sweep name, so nothing is reused from the variant records. Reports, per variant, the
p50 as timed and as judged (normalised, then re-timed with the other finalists) in both runs,
the verdicts and the winners. With no recipes the sweeps are searches (the same seed: the
same trials, their prefixes reused from the first run); ``--workload-recipes`` runs the
workload's hand-written list instead. Writes the "load_<workload>_<runner>" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _report import table, write_section  # noqa: E402

BURNER = "while True: pass"


def sweep(args, name: str, max_latency_ms: float | None):
    from flows.compress import run
    from shrinkflow.specs import Budget, SweepSpec

    budget = Budget(max_latency_ms=max_latency_ms) if max_latency_ms else None
    spec = SweepSpec(name=name, registry_name=f"{name}-model", workload=args.workload, device=args.device,
                     budget=budget, runner=args.runner, workers=2 if args.runner == "dask" else 1,
                     workload_recipes=args.workload_recipes)
    return run(spec)


def splitting_limit(p50s: list[float]) -> float:
    """A latency limit between two neighbouring variants of the middle half, where their p50s are
    furthest apart (relatively): it splits the variants, and none sits within noise of it."""
    n = len(p50s)
    pairs = [(p50s[i + 1] / p50s[i], i) for i in range(max(0, n // 4 - 1), min(n - 1, 3 * n // 4 + 1))] or [(1.0, 0)]
    _, i = max(pairs)
    return round(statistics.geometric_mean(p50s[i:i + 2]), 4)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="digits")
    ap.add_argument("--device", default="rpi4")
    ap.add_argument("--runner", default="dask", choices=("dask", "threads"))
    ap.add_argument("--workload-recipes", action="store_true", help="the workload's hand-written list, not a search")
    args = ap.parse_args()
    for var in ("MLFLOW_TRACKING_URI", "SHRINKFLOW_ARTIFACT_STORE", "PREFECT_API_URL"):
        os.environ.pop(var, None)
    os.environ["SHRINKFLOW_HOME"] = tempfile.mkdtemp(prefix="load-bench-")
    from tasks.config import prepare_environment

    prepare_environment()
    first = sweep(args, "load-calibrate", None)
    limit = splitting_limit(sorted(v.report.latency_p50_ms for v in first.variants if v.report))
    quiet = sweep(args, "load-quiet", limit)
    core = str((os.cpu_count() or 1) - 1)
    burner = subprocess.Popen(["taskset", "-c", core, sys.executable, "-c", BURNER])
    try:
        loaded = sweep(args, "load-burner", limit)
    finally:
        burner.kill()
        burner.wait()
    by_name = {v.name: v for v in quiet.variants}
    rows, same = [], True
    for v in loaded.variants:
        q = by_name[v.name]
        if not (q.report and v.report):
            rows.append([v.name, "-", "-", "-", "-", q.skipped or "-", v.skipped or "-"])
            continue
        same &= q.fits == v.fits
        rows.append([v.name, f"{q.report.latency_raw_p50_ms:.3f}", f"{q.report.latency_p50_ms:.3f}",
                     f"{v.report.latency_raw_p50_ms:.3f}", f"{v.report.latency_p50_ms:.3f}", q.fits, v.fits])
    winners = (quiet.selection.winner, loaded.selection.winner)
    verdict = "identical" if same and winners[0] == winners[1] else "DIFFERENT"
    body = "\n".join([
        f"`{args.workload}` on `{args.device}`, {args.runner} runner, "
        f"{'the workload' + chr(39) + 's hand-written recipes' if args.workload_recipes else 'a search (no recipes)'}, max_latency_ms = {limit} (between the two "
        f"middle variants furthest apart in an unloaded calibration run). Burner: `taskset -c {core} python -c '{BURNER}'` for the whole loaded sweep.",
        "",
        table(["variant", "unloaded p50 as timed ms", "unloaded p50 judged ms", "burner p50 as timed ms",
               "burner p50 judged ms", "fits unloaded", "fits with burner"], rows),
        "",
        f"Winner unloaded: {winners[0]}; with the burner: {winners[1]}. Verdicts and winner: **{verdict}**.",
        f"Re-time pass: {quiet.timings.get('retime_s', 0):.1f} s unloaded, {loaded.timings.get('retime_s', 0):.1f} s "
        "with the burner.",
    ])
    write_section(f"load_{args.workload}_{args.runner}", body)
    print(body)
    return 0 if verdict == "identical" else 1


if __name__ == "__main__":
    raise SystemExit(main())
