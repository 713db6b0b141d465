"""Kinds of models a user brings, each through the CLI with no recipes (so: a search, one trial
here), to a promoted variant that is pulled, loaded with the printed snippet, and reproduces its
reported quality from the pulled file in a fresh process. The BERT kinds: test_byo_models.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.integration.conftest import ROOT
from tests.integration.test_end_to_end import shrinkflow

pytestmark = pytest.mark.integration
pytest.importorskip("executorch", reason="the executorch package (the minilm extra) is not installed")

#: workload factory -> how the fresh process rebuilds its test split (digits images, or rows as sequences)
KINDS = {
    "mobilenet_digits": "digits_splits(0)[2]",  # BatchNorm, depthwise convolutions, inverted residuals
    "gru_digits": "digits_splits(0, sequence=True)[2]",  # its train split: an iterable DataLoader
    "lstm_digits": "digits_splits(0, sequence=True)[2]",
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_model_kind_with_no_recipes_is_promoted_pulled_and_reproduces_its_quality(stack, stack_env, tmp_path, kind):
    env = {**stack_env, "PYTHONPATH": str(ROOT)}
    model = kind.replace("_", "-") + "-rpi4"
    proc = shrinkflow(["run", "--workload", f"tests.unit.plugin_workload:{kind}", "--device", "rpi4",
                       "--trials", "1", "--runner", "threads"], env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "t000-int8" in proc.stdout  # the search's first trial: the teacher quantized after training
    client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias(model, "champion")
    reported = client.get_run(version.run_id).data.metrics["quality"]

    pulled = shrinkflow(["pull", f"models:/{model}@champion", "--out", str(tmp_path / "pulled")], env, tmp_path)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    snippet = next(line.strip() for line in pulled.stdout.splitlines() if "python -c" in line)
    venv_first = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    run_snippet = subprocess.run(snippet, shell=True, env=venv_first, capture_output=True, text=True, timeout=300)
    assert run_snippet.returncode == 0 and "10])" in run_snippet.stdout, run_snippet.stdout[-500:] + run_snippet.stderr[-2000:]

    program = next(p for p in (tmp_path / "pulled").iterdir() if p.name.startswith("model."))
    check = textwrap.dedent(f"""
        import json
        from shrinkflow import artifact
        from shrinkflow.workloads import accuracy
        from tests.unit.plugin_workload import digits_splits
        test = {KINDS[kind]}
        print(json.dumps({{"accuracy": accuracy(artifact.load("{program}"), test)}}))
    """)
    fresh = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    got = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert got["accuracy"] == pytest.approx(reported, abs=1e-6) and got["accuracy"] > 0.85
