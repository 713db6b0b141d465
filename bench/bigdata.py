"""A training split larger than the memory the process may use, read from an iterable DataLoader.

    python bench/bigdata.py [--gib 1.5] [--limit-mib 1024]

Each run is a fresh process in a cgroup (v1 ``memory`` controller, or v2) whose memory limit is
``--limit-mib`` (swap included, where the kernel accounts it). The process builds a Workload
whose ``train`` split is an iterable DataLoader of ``--gib`` GiB (float32 features, labels from
the teacher), reads it (``shrinkflow.data.as_split``), hashes it, runs the teacher on all of it,
and distils and int8-quantizes a half-width student through ``pipeline.run_variant``, as a sweep
does. Two runs: (spill) the default threshold (a quarter of the limit: the split goes to mapped
files past it) and (held) the threshold above the split's size (the whole split in memory, as
before this change). Reports exit status, wall time, the cgroup's peak usage and the student's
quality. Needs root (it creates a cgroup); writes the "bigdata" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import table, write_section  # noqa: E402

FEATURES, CLASSES, BATCH = 1024, 10, 4096


def child(gib: float) -> None:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, IterableDataset, TensorDataset

    from shrinkflow import data, pipeline, steps
    from shrinkflow.budget import resolve
    from shrinkflow.cache import DirCache
    from shrinkflow.specs import DistillSpec, QuantSpec, Recipe
    from shrinkflow.workloads import Workload, accuracy

    torch.manual_seed(0)
    torch.set_num_threads(1)

    def mlp(width: float = 1.0, depth: float = 1.0) -> nn.Module:
        hidden = max(8, int(512 * width))
        return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))

    teacher = mlp().eval()
    batches = int(gib * 2**30 / (BATCH * FEATURES * 4))

    class Stream(IterableDataset):  # the user's data, generated batch by batch: never whole in memory
        def __iter__(self):
            for i in range(batches):
                x = torch.randn(BATCH, FEATURES, generator=torch.Generator().manual_seed(i))
                with torch.inference_mode():
                    yield x, teacher(x).argmax(-1)

    def held_out(seed: int) -> TensorDataset:
        x = torch.randn(BATCH, FEATURES, generator=torch.Generator().manual_seed(10**6 + seed))
        with torch.inference_mode():
            return TensorDataset(x, teacher(x).argmax(-1))

    t0 = time.perf_counter()
    wl = Workload(name="big", teacher=teacher, train=DataLoader(Stream(), batch_size=None), val=held_out(0),
                  test=held_out(1), quality=accuracy, make_student=mlp).check()
    read_s = time.perf_counter() - t0
    ctx = steps.context(wl, DirCache(Path(tempfile.mkdtemp())), 0)
    recipe = Recipe(name="kd-w50+int8", steps=(DistillSpec(width=0.5, epochs=1, samples_per_epoch=131072, patience=1),
                                                QuantSpec(scheme="int8-dynamic")))
    result, _ = pipeline.run_variant(ctx, recipe, *resolve("rpi4", None), 1.0)
    print(json.dumps({"rows": len(wl.train), "gib": len(wl.train) * FEATURES * 4 / 2**30, "read_s": read_s,
                      "spill_mib": data.SPILL_BYTES / 2**20, "quality": result.report.quality if result.report else None,
                      "skipped": result.skipped, "teacher_samples": ctx.forward_samples}))


def cgroup(limit: int) -> tuple[Path, list[Path]]:
    """A fresh memory cgroup with ``limit`` bytes (and swap) allowed; (its procs file, its peak files)."""
    name = f"shrinkflow-bigdata-{os.getpid()}"
    v1 = Path("/sys/fs/cgroup/memory")
    if v1.is_dir():
        group = v1 / name
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
        return group, [group / "memory.max_usage_in_bytes"]
    group = Path("/sys/fs/cgroup") / name
    group.mkdir()
    (group / "memory.max").write_text(str(limit))
    (group / "memory.swap.max").write_text("0")
    return group, [group / "memory.peak"]


def run(gib: float, limit: int, spill_mib: float | None) -> dict:
    group, peak = cgroup(limit)
    env = {**os.environ, "SHRINKFLOW_HOME": tempfile.mkdtemp(prefix="bigdata-"), "OMP_NUM_THREADS": "1"}
    env.pop("SHRINKFLOW_SPILL_MB", None)
    if spill_mib is not None:
        env["SHRINKFLOW_SPILL_MB"] = str(spill_mib)
    procs = group / "cgroup.procs"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", str(gib)], env=env, capture_output=True, text=True,
                          preexec_fn=lambda: procs.write_text(str(os.getpid())))  # in the group before it execs
    wall = time.perf_counter() - t0
    out = {"exit": proc.returncode, "wall_s": wall,
           "peak_mib": int(peak[0].read_text()) / 2**20 if peak[0].exists() else None}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines:
        out.update(json.loads(lines[-1]))
    else:
        out["error"] = (proc.stderr.strip().splitlines() or [f"killed by signal {-proc.returncode}"])[-1][:200]
    group.rmdir()
    return out


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["--child"]:
        child(float(args[1]))
        return 0
    gib = float(args[args.index("--gib") + 1]) if "--gib" in args else 1.5
    limit = int(float(args[args.index("--limit-mib") + 1]) * 2**20) if "--limit-mib" in args else 2**30
    runs = {"spill": run(gib, limit, None), "held": run(gib, limit, gib * 1024 * 2)}
    rows = []
    for name, r in runs.items():
        rows.append([name, f"{r.get('spill_mib', 0):.0f}" if "spill_mib" in r else "-", r["exit"], f"{r['wall_s']:.1f}",
                     f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-",
                     f"{r['gib']:.2f}" if "gib" in r else "-",
                     f"{r['quality']:.4f}" if r.get("quality") is not None else r.get("error", r.get("skipped", "-"))])
    body = "\n".join([
        f"A {gib:.2f} GiB training split ({FEATURES} float32 features per sample, from an iterable DataLoader that "
        f"generates it batch by batch) in a process whose cgroup may use {limit / 2**20:.0f} MiB, swap included. The "
        "process reads the split, hashes it, runs the teacher (an MLP) on all of it, distils a half-width student for "
        "131,072 samples and int8-quantizes it (`pipeline.run_variant`). spill: the default threshold (a quarter of "
        "the limit); held: a threshold above the split, so it stays in memory as before.",
        "",
        table(["run", "threshold MiB", "exit", "wall s", "cgroup peak MiB", "split GiB", "student accuracy / error"], rows),
    ])
    write_section("bigdata", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
