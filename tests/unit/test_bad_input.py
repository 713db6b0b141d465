"""Bad input is refused before anything runs: exit code 2, one line naming the field and what was
expected, and nothing written to MLflow or the artifact store."""

from __future__ import annotations

import pytest

from flows.cli import EXIT_BAD_INPUT, main

STEP = "recipes:\n  - name: r\n    steps:\n      - "
CASES = [
    ("invalid-yaml", "name: [unclosed", "not valid YAML"),
    ("not-a-mapping", "- a\n- b\n", "expected a YAML mapping"),
    ("unknown-key", "colour: red\n", "Unknown field 'colour'"),
    ("unknown-step-key", STEP + "{kind: prune, strength: 3}\n", "Unknown field 'recipes.0.steps.0.prune.strength'"),
    ("seed-wrong-type", "seed: abc\n", "field 'seed'"),
    ("recipes-wrong-type", "recipes: 7\n", "field 'recipes'"),
    ("ratio-above-1", STEP + "{kind: prune, ratio: 1.5}\n", "field 'recipes.0.steps.0.prune.ratio'"),
    ("ratio-negative", STEP + "{kind: prune, ratio: -0.1}\n", "greater than 0"),
    ("iterations-zero", STEP + "{kind: prune, iterations: 0}\n", "field 'recipes.0.steps.0.prune.iterations'"),
    ("unknown-technique", STEP + "{kind: sparsify}\n", "'distill', 'prune', 'finetune', 'quantize'"),
    ("unknown-scheme", STEP + "{kind: quantize, scheme: int4}\n", "'int8-dynamic'"),
    ("scheme-layer-mismatch", STEP + "{kind: quantize, scheme: int8-dynamic, layers: conv}\n", "expected one of ['all', 'linear']"),
    ("quantize-not-last", STEP + "{kind: quantize}\n      - {kind: prune}\n", "expected quantize steps last"),
    ("unknown-device", "device: toaster\n", "field 'device'"),
    ("negative-size-budget", "budget: {max_size_mb: -1}\n", "field 'budget.max_size_mb'"),
    ("zero-latency-budget", "budget: {max_latency_ms: 0}\n", "field 'budget.max_latency_ms'"),
    ("negative-quality-drop", "budget: {max_quality_drop: -0.5}\n", "field 'budget.max_quality_drop'"),
    ("zero-threads", "budget: {threads: 0}\n", "field 'budget.threads'"),
    ("zero-workers", "workers: 0\n", "field 'workers'"),
    ("bad-dask-address", "dask_address: localhost8786\n", "field 'dask_address'"),
    ("duplicate-recipes", "recipes:\n  - {name: a, steps: [{kind: quantize}]}\n  - {name: a, steps: [{kind: quantize}]}\n",
     "duplicate names"),
    ("bad-name", "name: has spaces\n", "field 'name'"),
    ("unknown-workload", "workload: nosuch\n", "Unknown workload 'nosuch'"),
    ("factory-missing", "workload: tests.unit.nosuch:make\n", "cannot be imported"),
    ("factory-wrong-type", "workload: tests.unit.plugin_workload:not_a_workload\n", "expected shrinkflow.workloads.Workload"),
    ("teacher-data-mismatch", "workload: tests.unit.plugin_workload:mismatched\n", "do not match its labels"),
    ("empty-dataset", "workload: tests.unit.plugin_workload:empty\n", "field 'test' is empty"),
    ("quality-raises", "workload: tests.unit.plugin_workload:bad_quality\n", "field 'quality' fails on the teacher"),
    ("dict-batches-unnamed", "workload: tests.unit.plugin_workload:dict_batches_unnamed\n", "field 'inputs' to name the keys"),
    ("text-not-tokenized", "workload: tests.unit.plugin_workload:text_not_tokenized\n", "expected tensors only"),
    ("search-runtime-not-searched", "device: rpi4\nsearch: {runtime: onnx}\n", "the search builds programs for"),
    ("step-after-pack-time-scheme", "recipes:\n  - name: r\n    runtime: onnx\n    steps:\n"
     "      - {kind: quantize, scheme: int8-static-ort, layers: conv}\n      - {kind: quantize, scheme: fp16, layers: linear}\n",
     "expected it as the recipe's last step"),
    ("layer-map-bad-index", "workload: tests.unit.plugin_workload:bert_uncached\n" + STEP
     + "{kind: distill, init: parent, depth: 0.5, hidden: 1.0, layer_map: [5]}\n", "DistillSpec.layer_map=[5]"),
    ("layer-map-without-layer-losses", STEP + "{kind: distill, layer_map: [0]}\n", "layer_map is used only by the layer-wise losses"),
    ("layer-losses-on-a-model-without-transformer-layers", "workload: tests.unit.plugin_workload:make\n" + STEP
     + "{kind: distill, relations: 1.0}\n",
     "DistillSpec.hidden/relations (the teacher) needs transformer layers"),
    ("hf-without-task", "workload: hf:/nonexistent/my-bert\ndata: /nonexistent/texts.txt\n", "needs 'task' (--task)"),
    ("task-without-hf", "task: sentence-embedding\n", "expected them only with an 'hf:PATH' workload"),
    ("hf-not-a-model-directory", "workload: hf:/nonexistent/my-bert\ntask: sentence-embedding\ndata: /nonexistent/texts.txt\n",
     "Workload 'hf:/nonexistent/my-bert' has no config.json"),
    ("missing-capability", "workload: tests.unit.plugin_workload:no_student\n" + STEP + "{kind: distill}\n",
     "Recipe 'r' steps[0] (distill) needs the workload's 'make_student'"),
]


@pytest.mark.parametrize(("case", "text", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, case, text, expected):
    home = tmp_path / "home"
    monkeypatch.setenv("SHRINKFLOW_HOME", str(home))
    for var in ("MLFLOW_TRACKING_URI", "SHRINKFLOW_ARTIFACT_STORE", "PREFECT_API_URL"):
        monkeypatch.delenv(var, raising=False)
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    assert main(["run", str(spec)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (home / "mlflow.db").exists() and not (home / "mlartifacts").exists()
    assert not (home / "artifacts").exists()  # the store: no object, not even the teacher cache


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20
