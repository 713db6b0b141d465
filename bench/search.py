"""The search against the hand-written default sweep, in one run, on the same machine.

    python bench/search.py [--cases digits:mcu-nrf52840,digits:rpi4] [--trials 16] [--same-time] [--section NAME]

For each case (workload:device), the compress flow runs twice through the same code path
(flows.compress.run, a local Dask cluster of 2 workers, a fresh shrinkflow home each, the teacher
trained once beforehand and copied in): (hand) the workload's own hand-written recipe list
(``workload_recipes: true``), (search) no recipes, ``--trials`` trials; with ``--same-time``,
up to 60 trials under a time budget (``search.minutes``) equal to the hand sweep's variants phase
(its wall time from the teacher's end to the last variant's: the part of the flow a search
replaces; the search's sensitivity pass counts against it, and no batch starts that would end
past it). Reports each winner's quality, size and the ratio to the teacher's shipped size, the
flow's wall time and its variants (or search) phase, and the search's efficiency (trials stopped by the pruner, rejected by the size floor, and trials that reuse another's training under another quantization),
then every variant each sweep measured, with the limits it missed. Writes the "search" section
of docs/BENCHMARKS.md ("search-same-time" with ``--same-time``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _report import table, write_section  # noqa: E402


def one(workload: str, device: str, mode: str, trials: int, seed_home: Path, minutes: float | None = None) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"sf-search-{mode}-"))
    shutil.copytree(seed_home / "cache", home / "cache")  # the trained teacher, as a first sweep leaves it
    os.environ["SHRINKFLOW_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from flows.compress import run
    from shrinkflow.select import misses_text
    from shrinkflow.specs import SweepSpec, parse

    data = {"name": f"bench-{mode}", "workload": workload, "device": device, "runner": "dask", "workers": 2}
    data |= {"workload_recipes": True} if mode == "hand" else {"search": {"trials": trials, "minutes": minutes}}
    t0 = time.perf_counter()
    out = run(parse(SweepSpec, data))
    wall = time.perf_counter() - t0
    win = next((v for v in out.variants if v.name == out.selection.winner), None)
    teacher = out.teacher.report
    # every measured variant: what it reached and, when it missed, which limits by how much
    measured = [(v.name, v.report.quality, v.report.size_bytes, v.report.latency_p50_ms,
                 "yes" if v.fits else misses_text(out.variants, [v.name]).removeprefix(f"{v.name} (").removesuffix(")"))
                for v in out.variants if v.report is not None]
    row = {"mode": mode, "wall_s": wall, "variants": len(out.variants), "winner": win.name if win else "none fits",
           "measured": measured,
           "quality": win.report.quality if win else None, "size": win.report.size_bytes if win else None,
           "teacher_quality": teacher.quality, "teacher_size": teacher.size_bytes, "timings": out.timings}
    shutil.rmtree(home, ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="digits:mcu-nrf52840,digits:rpi4")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--same-time", action="store_true", help="search for the hand sweep's variants phase")
    ap.add_argument("--section", default=None, help="BENCHMARKS.md section (default: search or search-same-time, "
                    "with the workloads appended when --cases is not the default)")
    args = ap.parse_args()
    from tasks.config import prepare_environment

    prepare_environment(quiet=True)
    seed_home = Path(tempfile.mkdtemp(prefix="sf-search-seed-"))
    os.environ["SHRINKFLOW_HOME"] = str(seed_home)
    from shrinkflow import workloads

    rows = []
    for case in args.cases.split(","):
        workload, device = case.split(":")
        workloads.load(workload, seed=0)  # trains (once) and caches the teacher under the seed home
        for mode in ("hand", "search"):
            minutes = rows[-1][1]["timings"]["variants_s"] / 60 if args.same_time and mode == "search" else None
            r = one(workload, device, mode, 60 if minutes else args.trials, seed_home, minutes)
            print(case, mode, {k: v for k, v in r.items() if k not in ("timings", "measured")}, flush=True)
            rows.append((case, r))
    body = [__doc__.split("\n\n", 2)[2].strip(), "", table(
        ["case", "sweep", "winner", "quality (drop, points)", "size", "x smaller than teacher", "flow wall (s)",
         "variants phase (s)", "trained / pruned / floor-skipped / reusing a training"],
        [[case, r["mode"], f"`{r['winner']}`",
          "-" if r["quality"] is None else f"{r['quality']:.4f} ({(r['teacher_quality'] - r['quality']) * 100:.2f})",
          "-" if r["size"] is None else f"{r['size'] / 1000:,.1f} kB",
          "-" if r["size"] is None else f"{r['teacher_size'] / r['size']:.1f}x", f"{r['wall_s']:.1f}",
          f"{r['timings']['variants_s']:.1f}",
          "-" if r["mode"] == "hand" else "{:g} / {:g} / {:g} / {:g}".format(
              r["timings"].get("search_trials_trained", 0), r["timings"].get("search_trials_pruned", 0),
              r["timings"].get("search_trials_floor_skipped", 0), r["timings"].get("search_trials_reusing_training", 0))]
         for case, r in rows])]
    for case, r in rows:
        body += ["", f"Every variant measured, {case} {r['mode']}"
                 + (f" (sensitivity pass {r['timings'].get('search_sensitivity_seconds', 0):.1f} s; "
                    f"{r['timings'].get('search_trials_not_run', 0):g} asked trials not run for the time budget)"
                    if r["mode"] == "search" else "") + ":", "",
                 table(["variant", "quality", "size", "p50 ms", "fits (or what it missed)"],
                       [[f"`{n}`", f"{q:.4f}", f"{b / 1000:,.1f} kB", f"{p:.2f}", why] for n, q, b, p, why in r["measured"]])]
    section = args.section or ("search-same-time" if args.same_time else "search")
    if args.section is None and args.cases != ap.get_default("cases"):
        section += "-" + "-".join(dict.fromkeys(case.split(":")[0] for case in args.cases.split(",")))
    write_section(section, "\n".join(body))


if __name__ == "__main__":
    main()
