"""A sweep explains itself against real servers: the MLflow parent run's description, the
experiment kind, the registered version's description and tags, and a pulled model whose printed
load snippet runs as printed in a fresh process."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from shrinkflow.specs import SweepSpec, parse

pytestmark = pytest.mark.integration

MODEL = "explained-model"


def test_sweep_is_described_and_the_pulled_snippet_runs(stack, stack_env, tmp_path):
    from flows.compress import run

    spec = parse(SweepSpec, {"name": "explained", "workload": "tests.unit.plugin_workload:make", "device": "rpi4",
                             "runner": "threads", "registry_name": MODEL, "budget": {"max_quality_drop": 1.0},
                             "recipes": [{"name": f"kd-w{w}", "steps": [{"kind": "distill", "width": w / 100, "epochs": 3}]}
                                         for w in (25, 50)]})
    outcome = run(spec)
    assert outcome.promotion and outcome.promotion.promoted
    sel = outcome.selection

    client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("explained")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    note = client.get_run(outcome.parent_run_id).data.tags["mlflow.note.content"]
    assert sel.winner in note and sel.why in note and sel.rule in note and "Flow run: None" not in note
    assert f"{stack_env['MLFLOW_TRACKING_URI'].rstrip('/')}/#/experiments/{exp.experiment_id}/runs/" in note

    mv = client.get_model_version(MODEL, outcome.promotion.version)
    assert "**Budget:**" in mv.description and "float32 (N, 6)" in mv.description and "load_model" in mv.description
    assert mv.tags["inputs"].endswith("(N, 6), N from 1 to unbounded")
    assert mv.tags["spec.device"] == "rpi4" and not mv.tags["metrics"].startswith("{")

    out = tmp_path / "pulled"
    pulled = subprocess.run([sys.executable, "-m", "flows.cli", "pull", f"models:/{MODEL}@champion", "--out", str(out)],
                            env=stack_env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    lines = pulled.stdout.splitlines()
    caption = next(i for i, line in enumerate(lines) if line.startswith("Load it with"))
    assert lines[caption] == "Load it with plain PyTorch:"
    command = shlex.split(lines[caption + 1].strip())  # cd DIR && python -c CODE
    assert command[:2] == ["cd", str(out)] and command[3:5] == ["python", "-c"]
    fresh = subprocess.run([sys.executable, "-c", command[5]], cwd=command[1], capture_output=True, text=True, timeout=300, check=False)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert fresh.stdout.strip().splitlines()[-1] == "torch.Size([1, 3])"
