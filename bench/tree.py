"""The default sweeps as a tree of steps: each distinct training prefix computed once.

    python bench/tree.py

Digits (measured): the default digits sweep on `mcu-nrf52840`, run twice in one process over
the core (no Prefect, no MLflow), one thread, the teacher trained and cached beforehand:
(before) with no prefix cache, so every recipe replays its steps from the teacher, as the
one-task-per-recipe flow did; (after) with the content-addressed prefix cache, so each distinct
prefix (distill, prune, finetune, vocab) is computed once and every recipe that shares it loads
it. Reports wall time, steps computed and reused, and the winner of each.

Digits and MiniLM (planned, no training): the flow's own cost estimate (training epochs, each
weighted by the width trained) of the default sweeps, counted per recipe (before) and per
distinct prefix (after), with the number of step tasks each way. Writes the "tree" section of
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _report import table, write_section  # noqa: E402


def planned(recipes) -> tuple[float, float, int, int]:
    """(training cost per recipe, per distinct prefix, step tasks per recipe, per distinct prefix)."""
    from shrinkflow import steps

    nodes, _ = steps.plan(recipes)
    per_recipe = sum(steps.training_work(r) for r in recipes)
    per_prefix = sum(steps.training_work(_as_recipe(n.steps)) - steps.training_work(_as_recipe(n.steps[:-1]))
                     for n in nodes)
    tasks_before = sum(len(steps.training_prefix(r)) for r in recipes)
    return per_recipe, per_prefix, tasks_before, len(nodes)


def _as_recipe(step_specs):
    from shrinkflow.specs import FinetuneSpec, Recipe

    return Recipe(name="x", steps=tuple(step_specs) or (FinetuneSpec(epochs=0),))


def measured(cached: bool, home: Path) -> tuple[float, dict[str, int], str]:
    from shrinkflow import pipeline, steps, workloads
    from shrinkflow.budget import resolve
    from shrinkflow.cache import DirCache
    from shrinkflow.measure import threads
    from shrinkflow.select import select

    cache = DirCache(home / "cache")
    wl = workloads.load("digits", seed=0, cache=cache)
    profile, limits = resolve("mcu-nrf52840")
    ctx = steps.context(wl, cache if cached else None, 0)
    ctx.teacher_out  # noqa: B018 - teacher outputs once, before the clock (both runs share them)
    results = []
    t0 = time.perf_counter()
    with threads(1):
        teacher, _ = pipeline.evaluate(ctx, "teacher", wl.teacher, None, profile, limits, None)
        for recipe in wl.default_recipes:
            results.append(pipeline.run_variant(ctx, recipe, profile, limits, teacher.report.quality)[0])
    return time.perf_counter() - t0, dict(ctx.stats), select(results).winner or "none"


def main() -> int:
    from shrinkflow import workloads
    from shrinkflow.workloads import digits, minilm

    home = Path(tempfile.mkdtemp(prefix="tree-bench-"))
    os.environ["SHRINKFLOW_HOME"] = str(home)
    workloads.load("digits", seed=0)  # trains and caches the teacher (untimed)
    runs = {label: measured(cached, home) for label, cached in (("before: no prefix cache", False),
                                                                ("after: prefix cache", True))}
    rows = [[label, f"{wall:.1f}", stats["computed"], stats["reused"], winner]
            for label, (wall, stats, winner) in runs.items()]
    plans = []
    for name, recipes in (("digits", digits.default_recipes()), ("minilm", minilm.default_recipes())):
        before, after, tasks_before, tasks_after = planned(recipes)
        plans.append([name, len(recipes), f"{before:.1f}", f"{after:.1f}", f"{1 - after / before:.0%}" if before else "-",
                      tasks_before, tasks_after])
    (wall_b, _, _), (wall_a, _, _) = runs.values()
    body = "\n".join([
        "Default digits sweep on `mcu-nrf52840` over the core in one process, one thread, teacher and its outputs "
        "computed beforehand (untimed); every recipe built, packed, measured and judged.",
        "",
        table(["run", "wall s", "training steps computed", "training steps reused", "winner"], rows),
        "",
        f"After / before: **{wall_a / wall_b:.2f}** of the wall time.",
        "",
        "The default sweeps by the flow's cost estimate (epochs x width trained), no training run:",
        "",
        table(["workload", "recipes", "training cost, per recipe (before)", "per distinct prefix (after)", "saved",
               "step tasks before", "step tasks after"], plans),
    ])
    write_section("tree", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
