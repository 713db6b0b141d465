"""What two workers can get out of this machine: the ceiling on a 2-worker fan-out, measured below the flow.

    python bench/contention.py [--repeats 3]

Two measurements, each in fresh processes, with nothing but this script's children running:

1. **Side by side.** One digits distillation of the kind the "fanout_long" section fans out
   (width 0.8, 80 epochs, no early stop, one thread, over the core: ``pipeline.run_variant``),
   timed alone, then two at once in two processes. The ratio (two at once / alone) is how much
   each slows the other down on the shared cores; ``2 / ratio`` is the most any 2-worker flow
   can gain on the training it fans out, whatever starts the workers.
2. **Start-up.** A Dask worker of the local cluster imports ``tasks.compress`` (its preload:
   torch, Prefect, MLflow and the core) before it takes a task. Timed as ``python -c "import
   tasks.compress"``, one alone and two at once: what a cluster started per flow run pays before
   its first variant, and what a cluster that is already running (joined by address) does not.

Writes the "contention" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _report import table, write_section  # noqa: E402

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from shrinkflow import budget, pipeline, workloads
from shrinkflow.cache import DirCache
from shrinkflow.measure import threads
from shrinkflow.specs import DistillSpec, Recipe
cache = DirCache(sys.argv[1])
ctx = pipeline.context(workloads.load("digits", 0, cache), cache, 0)
profile, limits = budget.resolve("rpi4", None)
recipe = Recipe(name="kd-w80-e80", steps=(DistillSpec(width=0.8, epochs=80, patience=80),))
ready = time.perf_counter()
if len(sys.argv) < 3:  # not just preparing the teacher and its outputs
    with threads(1):
        pipeline.build(ctx, recipe)
print(json.dumps({"train_s": time.perf_counter() - ready}))
"""


def _run(args: list[str], n: int, base: Path | None = None) -> list[float]:
    """Start ``n`` copies of ``python args`` at once; each one's wall seconds (or its own figure).
    With ``base``, each copy gets a cache of its own, copied from ``base`` (the teacher and its
    outputs, no student: the student is trained, not read back from the prefix cache), as its last argument."""
    argv = [[sys.executable, *args, *([_copy(base)] if base is not None else [])] for _ in range(n)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(a, cwd=ROOT, stdout=subprocess.PIPE, text=True) for a in argv]
    out = []
    for p in procs:
        text, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"child failed with exit {p.returncode}: {args}")
        last = text.strip().splitlines()[-1] if text.strip() else ""
        out.append(json.loads(last)["train_s"] if last.startswith("{") else time.perf_counter() - t0)
    return out


def _copy(base: Path) -> str:
    return shutil.copytree(base, tempfile.mkdtemp(prefix="run-", dir=base.parent), dirs_exist_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="contention-") as work:
        base = Path(work) / "base"
        _run(["-c", CHILD, str(base), "prepare"], 1)  # the teacher and its outputs, trained and cached once (untimed)
        train = ["-c", CHILD]
        alone, pair, imp1, imp2 = [], [], [], []
        for _ in range(args.repeats):  # interleaved, so a busy moment does not fall on one kind only
            alone.append(_run(train, 1, base)[0])
            pair.append(max(_run(train, 2, base)))
            imp1.append(_run(["-c", "import tasks.compress"], 1)[0])
            imp2.append(max(_run(["-c", "import tasks.compress"], 2)))
    med = {k: statistics.median(v) for k, v in {"alone": alone, "pair": pair, "imp1": imp1, "imp2": imp2}.items()}
    slow = med["pair"] / med["alone"]
    rows = [["one distillation alone (train s)", " / ".join(f"{x:.1f}" for x in alone), f"{med['alone']:.1f}"],
            ["two at once, the slower one (train s)", " / ".join(f"{x:.1f}" for x in pair), f"{med['pair']:.1f}"],
            ["one worker's imports alone (s)", " / ".join(f"{x:.1f}" for x in imp1), f"{med['imp1']:.1f}"],
            ["two workers' imports at once (s)", " / ".join(f"{x:.1f}" for x in imp2), f"{med['imp2']:.1f}"]]
    body = "\n".join([
        __doc__.split("\n\n", 2)[2].rsplit("\n\nWrites", 1)[0].strip(), "",
        f"{os.cpu_count()} cores; medians of {args.repeats}, interleaved.", "",
        table(["run", f"seconds ({args.repeats} runs)", "median"], rows), "",
        f"Two at once / alone: **{slow:.2f}**; so two workers reach at most **{2 / slow:.2f}x** one worker on the "
        f"training they share (before any start-up or serial work). A cluster started per run also pays "
        f"about {med['imp2']:.1f} s of imports before its first task."])
    write_section("contention", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
