import subprocess
import sys


def test_import_core_leaves_orchestration_stack_out():
    code = (
        "import sys, shrinkflow, shrinkflow.pipeline, shrinkflow.workloads.digits;"
        "bad=[m for m in ('prefect','mlflow','boto3','botocore','dask') if m in sys.modules];"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"core imported {proc.stdout.strip()}"
