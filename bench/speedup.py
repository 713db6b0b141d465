"""Speed-ups that hold outside the tool: the promoted variant against the teacher, as reported and
as measured again in a fresh process from the pulled files.

    python bench/speedup.py [--workload digits] [--device rpi4] [--workload-recipes] [--home DIR]

Runs one sweep (embedded defaults, threads runner; a search, or with ``--workload-recipes`` the
workload's hand-written list), pulls the promoted model with
`shrinkflow pull`, then in a fresh Python process loads the pulled program with the loader a
user would use (shrinkflow.artifact.load) and the teacher packed the way the sweep packs it, and
times both the way a user would: batch 1, the thread count the sweep measured with (its report
says), alternating calls, medians of 200. Compares the ratio of the two p50s with the one the sweep
reported (target: within 15%). ``--home`` runs in an existing shrinkflow home (a warm rerun:
the variants' records and prefixes are reused, the teacher and the finalists timed again).
Writes the "speedup_<workload>" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _report import table, write_section  # noqa: E402

FRESH = textwrap.dedent("""
    import json, statistics, sys, time, torch
    from shrinkflow import artifact, workloads
    workload, device, pulled, n_threads = sys.argv[1:5]
    wl = workloads.load(workload, seed=0)
    torch.set_num_threads(int(n_threads))  # the thread count the sweep measured with (its report says)
    shipped = artifact.load(__import__("pathlib").Path(pulled))
    teacher = artifact.unpack(artifact.pack(wl.teacher, wl.example_inputs, wl.dynamic_dims, "torch", wl.max_dims))
    times = {"variant": [], "teacher": []}
    with torch.inference_mode():
        for _ in range(20):
            shipped(*wl.example_inputs), teacher(*wl.example_inputs)
        for _ in range(200):
            for name, model in (("variant", shipped), ("teacher", teacher)):
                t0 = time.perf_counter_ns()
                model(*wl.example_inputs)
                times[name].append((time.perf_counter_ns() - t0) / 1e6)
    print(json.dumps({k: statistics.median(v) for k, v in times.items()}))
""")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="digits")
    ap.add_argument("--device", default="rpi4")
    ap.add_argument("--workload-recipes", action="store_true", help="the workload's hand-written list, not a search")
    ap.add_argument("--home", type=Path, help="an existing shrinkflow home to run in (default: a new one)")
    args = ap.parse_args()
    for var in ("MLFLOW_TRACKING_URI", "SHRINKFLOW_ARTIFACT_STORE", "PREFECT_API_URL"):
        os.environ.pop(var, None)
    home = args.home or Path(tempfile.mkdtemp(prefix="speedup-"))
    os.environ["SHRINKFLOW_HOME"] = str(home)
    from flows.compress import run
    from shrinkflow.specs import SweepSpec
    from tasks.config import prepare_environment

    prepare_environment()
    out = run(SweepSpec(name="speedup", workload=args.workload, device=args.device, runner="threads", workers=1,
                        workload_recipes=args.workload_recipes))
    if out.promotion is None or not out.promotion.promoted:
        print("nothing was promoted", file=sys.stderr)
        return 1
    winner = next(v for v in out.variants if v.name == out.selection.winner)
    reported = winner.report.latency_p50_ms / out.teacher.report.latency_p50_ms
    cli = Path(sys.executable).parent / "shrinkflow"
    subprocess.run([str(cli), "pull", f"models:/{out.promotion.model}@champion", "--out", str(home / "pulled")],
                   check=True, capture_output=True)
    pulled = next(p for p in (home / "pulled").iterdir() if p.name.startswith("model."))
    fresh = subprocess.run([sys.executable, "-c", FRESH, args.workload, args.device, str(pulled),
                            str(winner.report.threads)], check=True,
                           capture_output=True, text=True)
    p50 = json.loads(fresh.stdout.strip().splitlines()[-1])
    measured = p50["variant"] / p50["teacher"]
    off = abs(measured / reported - 1)
    rows = [["reported by the sweep", f"{out.teacher.report.latency_p50_ms:.3f}", f"{winner.report.latency_p50_ms:.3f}",
             f"{reported:.3f}"],
            ["fresh process, pulled files", f"{p50['teacher']:.3f}", f"{p50['variant']:.3f}", f"{measured:.3f}"]]
    body = "\n".join([
        f"`{args.workload}` on `{args.device}`, "
        f"{'the hand-written recipes' if args.workload_recipes else 'a search (no recipes)'}, threads runner; "
        f"promoted `{winner.name}` ({winner.report.artifact_format}), timed at {winner.report.threads} thread(s).",
        "",
        table(["where", "teacher p50 ms", "variant p50 ms", "variant / teacher"], rows),
        "",
        f"The two ratios differ by **{off:.1%}** (target: within 15%: {'met' if off <= 0.15 else 'NOT met'}).",
    ])
    write_section(f"speedup_{args.workload}", body)
    print(body)
    return 0 if off <= 0.15 else 1


if __name__ == "__main__":
    raise SystemExit(main())
