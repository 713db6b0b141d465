"""Run the default digits sweep with the core alone (no Prefect, no MLflow) and record it.

    python bench/digits_core.py [--device mcu-nrf52840]

Writes the "digits_core" section of docs/BENCHMARKS.md: one table for the target device (the
smallest preset digits can meet, with skipping on), and one for every recipe measured without
skipping (rpi4 budget), plus the wall time of each sweep.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import table, write_section  # noqa: E402

from shrinkflow import workloads  # noqa: E402
from shrinkflow.measure import threads  # noqa: E402
from shrinkflow.pipeline import sweep  # noqa: E402
from shrinkflow.specs import SweepSpec, SweepResult  # noqa: E402


def rows(result: SweepResult) -> list[list[object]]:
    t = result.teacher.report
    out = [["teacher", f"{t.quality:.4f}", t.size_bytes, t.params, f"{t.latency_p50_ms:.3f}", f"{t.energy_mj:.4f}", "-", "1.0x"]]
    for v in result.variants:
        if v.report is None:
            out.append([v.name, "-", "-", "-", "-", "-", f"skipped: {v.skipped}", "-"])
            continue
        r = v.report
        fit = "yes" if v.fits else "no: " + ", ".join(m.limit for m in v.verdict.misses)
        if v.name == result.selection.winner:
            fit = "**winner**"
        out.append([v.name, f"{r.quality:.4f}", r.size_bytes, r.params, f"{r.latency_p50_ms:.3f}",
                    f"{r.energy_mj:.4f}", fit, f"{t.size_bytes / r.size_bytes:.1f}x"])
    return out


HEAD = ["variant", "accuracy", "size B (xz)", "params", "p50 ms", "energy mJ (est.)", "fits", "smaller"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="mcu-nrf52840")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as home:
        import os

        os.environ["SHRINKFLOW_HOME"] = home
        t0 = time.perf_counter()
        wl = workloads.load("digits", seed=0)
        t_teacher = time.perf_counter() - t0
        runs = {}
        for device in (args.device, "rpi4"):
            t1 = time.perf_counter()
            with threads(1):  # single-threaded training, as the flow's workers do: the same models
                runs[device] = (sweep(SweepSpec(device=device), cache=Path(home) / "cache", workload=wl),
                                time.perf_counter() - t1)
    target, target_s = runs[args.device]
    win = next((v for v in target.variants if v.name == target.selection.winner), None)
    t = target.teacher.report
    lines = [f"Teacher training (first use, cached afterwards): {t_teacher:.1f} s.", ""]
    for device, (res, secs) in runs.items():
        lines += [f"### device `{device}`: sweep wall time {secs:.1f} s (teacher measured, {len(res.variants)} recipes)",
                  "", table(HEAD, rows(res)), ""]
    if win:
        ok = t.size_bytes / win.report.size_bytes >= 10 and t.quality - win.report.quality <= 0.01
        lines.append(f"Target (issue: >=10x smaller, <=1.0 point lost, sweep < 120 s on 2 cores) for `{args.device}`: "
                     f"winner `{win.name}` is {t.size_bytes / win.report.size_bytes:.1f}x smaller, "
                     f"{100 * (t.quality - win.report.quality):+.2f} points lost, sweep {target_s:.1f} s: "
                     f"{'met' if ok and target_s < 120 else 'NOT met'}.")
    else:
        lines.append(f"Nothing fitted `{args.device}`; nearest misses: {target.selection.nearest_misses}.")
    write_section("digits_core", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
