"""The CLI's input handling and exit codes (no servers: bad input is refused before any run)."""

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
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "home" / "mlflow.db").exists()


def test_devices_lists_presets():
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "devices"], capture_output=True, text=True)
    assert proc.returncode == 0
    for name in ("mcu-nrf52840", "rpi4", "phone", "jetson-orin-nano"):
        assert name in proc.stdout


def test_documented_example_spec_is_valid():
    from pathlib import Path

    spec = load_spec(str(Path(__file__).resolve().parents[2] / "docs" / "spec-example.yaml"), {})
    assert spec.device == "rpi4" and len(spec.recipes) == 4 and spec.budget.max_size_mb == 0.25
    assert [r.runtime for r in spec.recipes] == ["torch", "torch", "torch", "executorch"]
