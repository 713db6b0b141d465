"""The CLI's input handling and exit codes (no servers: bad input is refused before any run)."""

import io
import os
import subprocess
import sys

import pytest

from flows.cli import EXIT_BAD_INPUT, load_spec, main
from shrinkflow.errors import SpecError


@pytest.mark.parametrize(("text", "match"), [
    ("name: [unclosed", "not valid YAML"),
    ("- just\n- a list\n", "holds a list"),
    ("colour: red\n", "Unknown field 'colour'"),
    ("seed: minus-one\n", "field 'seed'"),
    ("recipes:\n  - name: r\n    steps:\n      - kind: prune\n        ratio: 2\n", "field 'recipes.0.steps.0.prune.ratio'"),
    ("budget:\n  max_size_mb: -3\n", "field 'budget.max_size_mb'"),
])
def test_bad_spec_files(tmp_path, text, match):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=match):
        load_spec(str(path), {})


def test_options_override_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("device: rpi4\nseed: 3\n")
    spec = load_spec(str(path), {"device": "phone", "seed": None})
    assert spec.device == "phone" and spec.seed == 3


@pytest.mark.parametrize("argv", [
    ["run", "--device", "toaster"],
    ["run", "--workload", "nosuch"],
    ["run", "--workload", "nosuch.module:fn"],
    ["run", "/nonexistent/spec.yaml"],
    ["pull", "not-a-model-uri", "--out", "x"],
    ["run", "--trials", "0"],
    ["run", "--minutes", "-5"],
    ["run", "--workload-recipes", "--trials", "4"],
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "home" / "mlflow.db").exists()


def test_a_search_the_device_contradicts_exits_2_naming_the_field(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "spec.yaml"
    path.write_text("device: mcu-nrf52840\nsearch: {runtime: executorch}\n")  # XNNPACK cannot run on a Cortex-M4
    assert main(["run", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "'search.runtime'" in err and "['torch']" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "home").exists()


def test_devices_lists_presets():
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "devices"], check=False, capture_output=True, text=True)
    assert proc.returncode == 0
    for name in ("mcu-nrf52840", "rpi4", "phone", "jetson-orin-nano"):
        assert name in proc.stdout


def test_documented_example_spec_is_valid():
    from pathlib import Path

    spec = load_spec(str(Path(__file__).resolve().parents[2] / "docs" / "spec-example.yaml"), {})
    assert spec.device == "rpi4" and len(spec.recipes) == 4 and spec.budget.max_size_mb == 0.25
    assert [r.runtime for r in spec.recipes] == ["torch", "torch", "torch", "executorch"]


def test_quiet_environment_leaves_what_the_user_set(monkeypatch, tmp_path):
    from tasks.config import QUIET_ENV, prepare_environment

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in QUIET_ENV})  # restored after
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "DEBUG")
    prepare_environment(quiet=True)
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "DEBUG"
    assert os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] == "ERROR"
    assert os.environ["KINETO_LOG_LEVEL"] == "6"


def test_progress_display_counts_and_estimates():
    from rich.console import Console

    from flows.cli import SweepDisplay, human_bytes
    from flows.compress import Progress

    out = io.StringIO()
    display = SweepDisplay(Console(file=out, width=160), "s: digits for rpi4", live=False)
    with display:
        display.update(Progress(stage="teacher"))
        display.update(Progress(stage="variants", total=4, running=2))
        display.variants_since -= 30  # 30 s into the variants
        display.update(Progress(stage="variants", total=4, done=1, failed=1, running=2))
    lines = out.getvalue()
    assert "teacher: outputs and baseline" in lines and "variants: 1/4 done, 1 failed" in lines
    task = display.progress.tasks[0]
    assert (task.completed, task.total) == (1, 4)
    assert "2 running, 1 failed, about 1m3" in task.fields["detail"]  # 30 s a variant, 3 left: about 90 s
    assert (human_bytes(34_552), human_bytes(2_500_000)) == ("34.6 kB", "2.50 MB")

    timed = SweepDisplay(Console(file=io.StringIO(), width=160), "s", live=False, budget_s=60)  # --minutes 1
    with timed:
        timed.update(Progress(stage="variants", total=16, running=2))
        assert "about 1m00s left" in timed.progress.tasks[0].fields["detail"]  # nothing done yet: the budget's end
        timed.variants_since -= 30.5
        timed.update(Progress(stage="variants", total=16, done=4, running=2))
        assert "about 0m29s left" in timed.progress.tasks[0].fields["detail"]  # the pace says 1m31s: the budget ends first
