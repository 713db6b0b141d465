"""Wall time of the end-to-end digits sweep through the flow, split by phase.

    python bench/flow_digits.py [--device mcu-nrf52840]

Runs `flows.compress.run` on embedded defaults (Prefect local mode, SQLite MLflow, local
artifact store, threads runner) in a fresh temporary home, twice: a first run (teacher trained,
outputs computed, every variant built) and a rerun of the same spec (teacher, outputs and every
variant reused). Writes the "flow_digits" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import table, write_section  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="mcu-nrf52840")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["SHRINKFLOW_HOME"] = home
        for var in ("MLFLOW_TRACKING_URI", "SHRINKFLOW_ARTIFACT_STORE", "PREFECT_API_URL"):
            os.environ.pop(var, None)
        from tasks.config import prepare_environment

        prepare_environment()
        from flows.compress import run
        from shrinkflow.specs import SweepSpec

        rows = []
        for label in ("first run (teacher trained, outputs computed)", "rerun of the same spec (resume: cache hits)"):
            t0 = time.perf_counter()
            out = run(SweepSpec(device=args.device, runner="threads", workers=1))
            total = time.perf_counter() - t0
            t = out.timings
            rows.append([label, f"{total:.1f}", f"{t['flow_s']:.1f}", f"{t['teacher_s']:.1f}", f"{t['variants_s']:.1f}",
                         f"{t['variant_tracking_s']:.1f}", f"{t['promotion_s']:.1f}", f"{t['report_and_tracking_s']:.1f}",
                         out.teacher_forward_samples, out.selection.winner])
    head = ["run", "wall s (incl. Prefect start)", "flow s", "teacher s", "variants s", "of which MLflow logging s",
            "promotion s", "report + parent run s", "teacher forward samples", "winner"]
    body = (f"Default digits sweep ({args.device}), threads runner, one variant at a time, embedded defaults.\n\n"
            + table(head, rows))
    write_section("flow_digits", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
