"""A user's model with two keyword inputs and dict batches (a Hugging Face BERT classifier built
from a config), and a Hugging Face model directory (hf:PATH), each through the CLI with no
recipes, the registry and pull, reproducing its reported quality."""

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
from tests.integration.test_end_to_end import shrinkflow, write_spec

pytestmark = pytest.mark.integration
pytest.importorskip("executorch", reason="the executorch package (the minilm extra) is not installed")
pytest.importorskip("transformers", reason="transformers (the minilm extra) is not installed")

MODEL = "bert-pair-rpi4"
SPEC = {
    "name": "it-bert-pair",
    "workload": "tests.unit.plugin_workload:bert_pair",
    "device": "rpi4",
    "runner": "threads",
    # no recipes: a search, one trial (its first: the teacher with XNNPACK int8), ExecuTorch programs only
    "search": {"trials": 1, "runtime": "executorch"},
}


def test_two_input_bert_is_promoted_pulled_served_by_name_and_reproduces_its_quality(stack, stack_env, tmp_path):
    env = {**stack_env, "PYTHONPATH": str(ROOT)}
    proc = shrinkflow(["run", write_spec(tmp_path, SPEC)], env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    version = MlflowClient(stack_env["MLFLOW_TRACKING_URI"]).get_model_version_by_alias(MODEL, "champion")
    reported = MlflowClient(stack_env["MLFLOW_TRACKING_URI"]).get_run(version.run_id).data.metrics["quality"]

    pulled = shrinkflow(["pull", f"models:/{MODEL}@champion", "--out", str(tmp_path / "pulled")], env, tmp_path)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    assert "input_ids: int64 (N, 16)" in pulled.stdout and "attention_mask: int64 (N, 16)" in pulled.stdout
    manifest = json.loads((tmp_path / "pulled" / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask"]
    snippet = next(line.strip() for line in pulled.stdout.splitlines() if "load_program" in line)
    venv_first = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}  # `python` is this one
    run_snippet = subprocess.run(snippet, shell=True, env=venv_first, capture_output=True, text=True, timeout=300)
    assert run_snippet.returncode == 0 and "torch.Size([1, 3])" in run_snippet.stdout, run_snippet.stderr[-2000:]

    # a fresh process: the pulled program and the registry's pyfunc (inputs by name) on the test split
    check = textwrap.dedent(f"""
        import json, lzma, mlflow, torch
        from executorch.runtime import Runtime
        from tests.unit.plugin_workload import _token_data
        test = _token_data(400, 2)  # the workload's test split (seed 0)
        data = lzma.decompress(open("{tmp_path / 'pulled' / 'model.pte.xz'}", "rb").read())
        method = Runtime.get().load_program(data).load_method("forward")
        logits = torch.cat([method.execute([test["input_ids"][i:i + 16], test["attention_mask"][i:i + 16]])[0]
                            for i in range(0, 400, 16)])
        served = mlflow.pyfunc.load_model("models:/{MODEL}@champion").predict(
            {{"attention_mask": test["attention_mask"][:40].numpy(), "input_ids": test["input_ids"][:40].numpy()}})
        print(json.dumps({{"accuracy": (logits.argmax(-1) == test["labels"]).float().mean().item(),
                          "served": (torch.as_tensor(served) - logits[:40]).abs().max().item()}}))
    """)
    fresh = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    got = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert got["accuracy"] == pytest.approx(reported, abs=1e-6) and got["accuracy"] > 0.9
    assert got["served"] < 1e-5


def test_hf_directory_with_no_recipes_is_searched_promoted_pulled_and_reproduces_its_quality(stack, stack_env, tmp_path):
    """`--workload hf:PATH --task sequence-classification --data FILE`, nothing else: a search, a
    promoted variant whose tokenizer ships beside it, and the pulled files give its reported quality."""
    from tests.unit.plugin_workload import news_rows, save_hf_dir, write_rows

    rows = news_rows(articles=16, per_article=4)  # 320 sentences, 5 topics
    save_hf_dir(tmp_path / "news-bert", rows=rows, epochs=6)
    write_rows(tmp_path / "news.jsonl", rows)
    env = {**stack_env, "PYTHONPATH": str(ROOT)}
    proc = shrinkflow(["run", "--workload", "hf:news-bert", "--task", "sequence-classification", "--data", "news.jsonl",
                       "--device", "rpi4", "--trials", "1", "--runner", "threads"], env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias("news-bert-rpi4", "champion")
    reported = client.get_run(version.run_id).data.metrics["quality"]

    pulled = shrinkflow(["pull", "models:/news-bert-rpi4@champion", "--out", str(tmp_path / "pulled")], env, tmp_path)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    assert {"tokenizer.json", "tokenizer_config.json", "hf_program.json"} <= {p.name for p in (tmp_path / "pulled").iterdir()}
    snippet = next(line.strip() for line in pulled.stdout.splitlines() if "python -c" in line)
    venv_first = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    run_snippet = subprocess.run(snippet, shell=True, env=venv_first, capture_output=True, text=True, timeout=300)
    assert run_snippet.returncode == 0 and "5])" in run_snippet.stdout, run_snippet.stdout[-500:] + run_snippet.stderr[-2000:]

    # a fresh process, as the user: the pulled tokenizer on the raw text of the test split, the registry's model
    check = textwrap.dedent(f"""
        import json, mlflow, numpy as np
        from transformers import AutoTokenizer
        from shrinkflow.workloads import hf
        pulled = "{tmp_path / 'pulled'}"
        program = json.load(open(pulled + "/hf_program.json"))
        tok = AutoTokenizer.from_pretrained(pulled)
        rows = hf.read_rows("{tmp_path / 'news.jsonl'}")
        test = hf.split_rows(rows, 0, "news.jsonl")["test"]
        label = {{name: int(i) for i, name in program["output"]["labels"].items()}}
        model = mlflow.pyfunc.load_model("models:/news-bert-rpi4@champion")
        right = 0
        for i in test:
            enc = tok([rows[i]["text"]], truncation=True, max_length=program["max_length"], return_tensors="np")
            out = model.predict({{name: enc[name].astype(np.int64) for name in program["inputs"]}})
            right += int(np.asarray(out).argmax(-1)[0] == label[rows[i]["label"]])
        print(json.dumps({{"accuracy": right / len(test), "n": len(test)}}))
    """)
    fresh = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    got = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert got["accuracy"] == pytest.approx(reported, abs=1.01 / got["n"]) and got["accuracy"] > 0.4
