"""Every variant kind logs to MLflow (torch.export "pt2") and loads in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from shrinkflow import artifact
from shrinkflow.prune import prune_
from shrinkflow.quantize import quantize
from shrinkflow.specs import PruneSpec, QuantSpec
from tests.unit.conftest import ToyCNN

pytestmark = pytest.mark.integration

KINDS = {
    "fp32": lambda m, ex, cal: m,
    "prune-unstructured": lambda m, ex, cal: (prune_(m, PruneSpec(method="magnitude-global", ratio=0.7), ex), m)[1],
    "prune-structured": lambda m, ex, cal: (prune_(m, PruneSpec(method="l1-structured", ratio=0.5), ex), m)[1],
    "student": lambda m, ex, cal: ToyCNN(4).eval(),
    "int8-dynamic": lambda m, ex, cal: quantize(m, QuantSpec(scheme="int8-dynamic"), ex),
    "int8-weight-only": lambda m, ex, cal: quantize(m, QuantSpec(scheme="int8-weight-only"), ex),
    "int8-static": lambda m, ex, cal: quantize(m, QuantSpec(scheme="int8-static"), ex, cal),
    "int8-static-local": lambda m, ex, cal: quantize(m, QuantSpec(scheme="int8-static", keep_float=("fc2",)), ex, cal),
    "fp16": lambda m, ex, cal: quantize(m, QuantSpec(scheme="fp16"), ex),
    "bf16-local": lambda m, ex, cal: quantize(m, QuantSpec(scheme="bf16", include=("fc*",)), ex),
}


def test_every_technique_logs_and_loads_in_a_fresh_process(tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from tasks import config, tracking

    torch.manual_seed(0)
    example, cal = (torch.randn(1, 1, 8, 8),), torch.randn(64, 1, 8, 8)
    probe = torch.randn(5, 1, 8, 8)
    exp = tracking.experiment_id("logging")
    expected = {}
    for kind, make in KINDS.items():
        model = make(ToyCNN().eval(), example, cal)
        packed = artifact.pack(model, example)
        shipped = artifact.unpack(packed)
        run_id = tracking.start_child("none", exp, kind)
        uri = tracking.log_model(run_id, shipped, example, packed.filename, packed.data)
        with torch.inference_mode():
            expected[kind] = (uri, shipped(probe).tolist())
    torch.save(probe, tmp_path / "probe.pt")
    check = textwrap.dedent(f"""
        import json, sys, mlflow, torch
        mlflow.set_tracking_uri({config.tracking_uri()!r})
        probe = torch.load({str(tmp_path / 'probe.pt')!r}, weights_only=True)
        out, served = {{}}, {{}}
        for kind, (uri, _) in json.load(open({str(tmp_path / 'expected.json')!r})).items():
            with torch.inference_mode():
                out[kind] = mlflow.pytorch.load_model(uri)(probe).tolist()
            served[kind] = mlflow.pyfunc.load_model(uri).predict(probe.numpy()).tolist()  # the generic way in
        print(json.dumps({{"out": out, "served": served, "torchao": "torchao" in sys.modules}}))
    """)
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["torchao"] is False  # quantized models load with plain torch
    for kind, (_, want) in expected.items():
        assert torch.allclose(torch.tensor(got["out"][kind]), torch.tensor(want), atol=1e-5), kind
        assert torch.allclose(torch.tensor(got["served"][kind]), torch.tensor(want), atol=1e-5), kind
