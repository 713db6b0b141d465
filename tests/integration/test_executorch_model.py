"""An ExecuTorch variant logs to MLflow as a pyfunc model and serves from a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from shrinkflow import artifact, pte
from tests.unit.test_executorch import TokenEncoder, ids

pytestmark = pytest.mark.integration
pytest.importorskip("executorch", reason="the executorch package (the minilm extra) is not installed")


def test_pte_variant_logs_as_pyfunc_and_predicts_in_a_fresh_process(tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from tasks import config, tracking

    torch.manual_seed(0)
    model = TokenEncoder().eval()
    example = (ids(1, 6),)
    packed = artifact.pack(model, example, (0, 1), "executorch")
    run_id = tracking.start_child("none", tracking.experiment_id("pte"), "pte")
    uri = tracking.log_model(run_id, artifact.unpack(packed), example, packed.filename, packed.data,
                             assets={"tokenizer.json": b"{}"}, dynamic_dims=(0, 1))
    probe = ids(20, 9, seed=4)  # more rows than one program call takes
    with torch.inference_mode():
        want = model(probe)
    torch.save(probe, tmp_path / "probe.pt")
    check = textwrap.dedent(f"""
        import json, sys, mlflow, torch
        mlflow.set_tracking_uri({config.tracking_uri()!r})
        probe = torch.load({str(tmp_path / 'probe.pt')!r}, weights_only=True)
        model = mlflow.pyfunc.load_model({uri!r})
        print(json.dumps({{"out": model.predict(probe.numpy()).tolist(), "shrinkflow": "shrinkflow" in sys.modules,
                          "inputs": model.metadata.get_input_schema().to_dict(),
                          "spec": model.metadata.metadata["inputs"]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["shrinkflow"] is False  # the logged model needs mlflow, torch and executorch only
    assert torch.allclose(torch.tensor(got["out"]), want, atol=1e-4)
    assert got["inputs"][0]["tensor-spec"]["shape"] == [-1, -1]
    assert got["spec"] == [{"name": "input_0", "dtype": "int64", "shape": [-1, -1], "dynamic": {
        "0": {"min": 1, "max": pte.PTE_MAX_BATCH}, "1": {"min": 1, "max": pte.PTE_MAX_DIM}}}]
    deploy = tracking.client().list_artifacts(run_id, "deploy")
    assert sorted(a.path for a in deploy) == ["deploy/model.pte.xz", "deploy/tokenizer.json"]


def test_onnx_variant_of_a_two_input_model_logs_and_predicts_by_input_name_in_a_fresh_process(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from shrinkflow.quantize import quantize
    from shrinkflow.specs import QuantSpec
    from tasks import config, tracking
    from tests.unit import plugin_workload as pw

    bert = pw.bert_pair(seed=0).check()
    q = quantize(bert.teacher, QuantSpec(scheme="int8-static-ort", layers="linear"), bert.example_inputs, bert.calibration)
    packed = artifact.pack(q, bert.example_inputs, runtime="onnx")
    run_id = tracking.start_child("none", tracking.experiment_id("onnx"), "onnx")
    uri = tracking.log_model(run_id, artifact.unpack(packed), bert.example_inputs, packed.filename, packed.data,
                             input_names=bert.input_names)
    ids, mask, _ = bert.test.tensors
    with torch.inference_mode():
        want = artifact.unpack(packed)(ids[:20], mask[:20])
    torch.save({"input_ids": ids[:20], "attention_mask": mask[:20]}, tmp_path / "probe.pt")
    check = textwrap.dedent(f"""
        import json, sys, mlflow, torch
        mlflow.set_tracking_uri({config.tracking_uri()!r})
        probe = torch.load({str(tmp_path / 'probe.pt')!r}, weights_only=True)
        model = mlflow.pyfunc.load_model({uri!r})
        out = model.predict({{k: v.numpy() for k, v in reversed(probe.items())}})  # by name, not by order
        print(json.dumps({{"out": out["output"].tolist(), "keys": sorted(out),  # a dict of outputs by name
                          "shrinkflow": "shrinkflow" in sys.modules, "spec": model.metadata.metadata["inputs"]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["shrinkflow"] is False  # mlflow, onnxruntime and numpy only
    assert got["keys"] == ["output"] and torch.allclose(torch.tensor(got["out"]), want, atol=1e-5)
    assert [i["name"] for i in got["spec"]] == ["input_ids", "attention_mask"]
    deploy = tracking.client().list_artifacts(run_id, "deploy")
    assert [a.path for a in deploy] == ["deploy/model.onnx.xz"]
