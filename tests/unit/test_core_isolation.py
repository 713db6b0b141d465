"""The core (shrinkflow/) runs on a bare edge box or in a notebook: torch, not the orchestration stack."""

import subprocess
import sys

ORCHESTRATION = ("prefect", "prefect_dask", "mlflow", "boto3", "botocore", "dask", "distributed", "tasks", "flows")


def test_import_core_leaves_orchestration_stack_out():
    code = (
        "import sys, shrinkflow, shrinkflow.pipeline, shrinkflow.workloads.digits;"
        f"bad=[m for m in {ORCHESTRATION!r} if m in sys.modules];"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, f"core imported {proc.stdout.strip()}"


def test_every_core_module_leaves_orchestration_stack_out():
    """Every module of shrinkflow/ (the workloads and the artifact formats included), in one fresh process."""
    code = (
        "import importlib, pkgutil, sys, shrinkflow\n"
        "names = [m.name for m in pkgutil.walk_packages(shrinkflow.__path__, 'shrinkflow.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        f"bad = [m for m in {ORCHESTRATION!r} if m in sys.modules]\n"
        "print(len(names), ','.join(bad)); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"core modules imported {proc.stdout.strip()} {proc.stderr[-2000:]}"
    assert int(proc.stdout.split()[0]) >= 15  # the walk found the core's modules
