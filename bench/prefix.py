"""Recipes that share a training prefix: the prefix runs once, whatever number of recipes share it.

    python bench/prefix.py [--epochs 60] [--repeats 3]

Three digits recipes share one distillation (width 0.5, ``--epochs`` epochs) and differ only in
their quantization. Each is run through the compress flow (embedded defaults, threads runner)
in a fresh home whose teacher is already trained and cached (untimed), as (a) one recipe alone
and (b) the three together, alternating, ``--repeats`` times. Reports the medians, the ratio
(b)/(a), and the prefix tasks run and reused. Writes the "prefix" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _report import table, write_section  # noqa: E402


def _spec(n: int, epochs: int):
    from shrinkflow.specs import DistillSpec, QuantSpec, Recipe, SweepSpec

    kd = DistillSpec(width=0.5, epochs=epochs, patience=epochs)  # no early stop: the same work each run
    quants = [QuantSpec(scheme="int8-static"), QuantSpec(scheme="int8-dynamic"), QuantSpec(scheme="fp16")]
    recipes = tuple(Recipe(name=f"kd-w50+{q.scheme}", steps=(kd, q)) for q in quants[:n])
    return SweepSpec(name=f"prefix-{n}", device="rpi4", recipes=recipes, runner="threads", workers=1)


def _teacher(base: Path) -> Path:
    """The digits teacher, trained once into a home of its own (untimed); its cache is copied into each run's home."""
    from shrinkflow import workloads
    from tasks import compress

    os.environ["SHRINKFLOW_HOME"] = str(base / "teacher-home")
    workloads.load("digits", cache=compress.store_cache())
    return base / "teacher-home" / "artifacts" / "cache" / "teachers"


def _one(n: int, epochs: int, teachers: Path) -> tuple[float, float, object]:
    from flows.compress import run

    with tempfile.TemporaryDirectory() as home:
        os.environ["SHRINKFLOW_HOME"] = home
        shutil.copytree(teachers, Path(home) / "artifacts" / "cache" / "teachers")
        t0 = time.perf_counter()
        out = run(_spec(n, epochs))
        return time.perf_counter() - t0, out.timings["flow_s"], out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for var in ("MLFLOW_TRACKING_URI", "SHRINKFLOW_ARTIFACT_STORE", "PREFECT_API_URL"):
        os.environ.pop(var, None)
    from tasks.config import prepare_environment

    prepare_environment()
    base = Path(tempfile.mkdtemp(prefix="prefix-bench-"))
    teachers = _teacher(base)
    walls: dict[int, list[float]] = {1: [], 3: []}
    flows: dict[int, list[float]] = {1: [], 3: []}
    last = {}
    for _ in range(args.repeats):
        for n in (1, 3):
            wall, flow_s, out = _one(n, args.epochs, teachers)
            walls[n].append(wall)
            flows[n].append(flow_s)
            last[n] = out
    rows = []
    for n in (1, 3):
        out = last[n]
        rows.append([f"{n} recipe{'s' if n > 1 else ''}", f"{statistics.median(walls[n]):.1f}",
                     f"{statistics.median(flows[n]):.1f}", ", ".join(f"{w:.1f}" for w in flows[n]),
                     out.timings.get("prefixes_computed", "-"), out.timings.get("prefixes_reused", "-")])
    ratio = statistics.median(flows[3]) / statistics.median(flows[1])
    body = (f"Digits, one distillation (width 0.5, {args.epochs} epochs, no early stop) shared by the recipes, "
            f"threads runner, teacher cached; medians of {args.repeats}, alternating.\n\n"
            + table(["sweep", "wall s (incl. Prefect start)", "flow s", "flow s, each run", "prefixes computed",
                     "prefixes reused"], rows)
            + f"\n\nRatio of the three-recipe flow to the one-recipe flow: **{ratio:.2f}** (target <= 1.3).")
    write_section("prefix", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
