"""`shrinkflow stack up | status | down` on loopback: SeaweedFS, MLflow, Prefect, a worker; and both
UIs in a real browser (headless Chromium from Debian's `chromium`, driven by Playwright), as a user
meets them: the deployments, the on-demand form, a run submitted from it, its artifacts, MLflow.

The stack starts once for all of it. Screenshots of every page go to the test's tmp dir (and to
$SHRINKFLOW_UI_SCREENS when set, to look at while developing).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

from tests.integration.conftest import seed_digits_teacher

pytestmark = pytest.mark.integration


def sf(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def _free_base() -> int:
    """A base port below the ephemeral range with base..base+5 and their SeaweedFS gRPC ports
    (+10000) all free, so no connection of another process can take one meanwhile."""
    import random
    import socket

    for _ in range(200):
        base = random.randrange(18000, 22000)
        try:
            socks = []
            for port in [base + i for i in range(6)] + [base + 10000 + i for i in range(6)]:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of ports for the stack")


#: The stack's S3 server honours conditional writes, which promotions rely on for the pointer.
CAS_CHECK = """
from tasks import config, storage
store = storage.open_store(config.store_uri())
body, etag = store.read("digits-phone/champion.json")
for expected in (None, '"0123456789abcdef0123456789abcdef"'):
    try:
        storage.swap_pointer(store, "digits-phone", body, expected)
        print("applied")
    except storage.Conflict:
        print("refused")
storage.swap_pointer(store, "digits-phone", body, etag)
print("moved")
"""


CHROMIUM = Path(os.environ.get("SHRINKFLOW_CHROMIUM", "/usr/bin/chromium"))
#: The on-demand form's dropdowns: top-level fields, then each step kind's (picked from the step's tabs).
FORM_SELECTS = ("Device", "Runner", "Objective")
STEP_SELECTS = {"Distill": ("Technique", "Loss", "Scheduler"), "Prune": ("Technique", "Method", "Scheduler"),
                "Fine-tune": ("Technique", "Scheduler"), "Quantize": ("Technique", "Scheme", "Layer kind"),
                "Vocabulary": ("Technique",)}
UI_SPEC = "ui-digits"  # the sweep the browser submits: device rpi4, so its model is digits-rpi4
UI_MODEL = "digits-rpi4"


def _browser_missing() -> str | None:
    """Why the browser part cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright's Python client is not installed (pip install -e '.[test]')"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    return None


def _api(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


class UI:
    """One headless Chromium page; every ``shot`` saved under ``screens`` (and $SHRINKFLOW_UI_SCREENS)."""

    def __init__(self, page, screens: Path) -> None:
        self.page, self.screens = page, screens
        screens.mkdir(parents=True, exist_ok=True)

    def shot(self, name: str) -> None:
        path = self.screens / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        if os.environ.get("SHRINKFLOW_UI_SCREENS"):
            shutil.copy(path, Path(os.environ["SHRINKFLOW_UI_SCREENS"]) / path.name)

    def open(self, url: str, text: str | re.Pattern, timeout: float = 30_000) -> None:
        """Go to ``url`` and wait until ``text`` shows (single-page apps render after load)."""
        self.page.goto(url)
        self.page.get_by_text(text).first.wait_for(timeout=timeout)

    def field(self, label: str):
        """The input (or dropdown) of the innermost form field whose label is ``label``."""
        title = self.page.locator("label").filter(has_text=re.compile(f"^{re.escape(label)}( \\(Optional\\))?$"))
        group = self.page.locator("div.group").filter(has=title).last
        return group.locator("fieldset").first.locator("input, textarea, button[aria-haspopup=listbox]").first

    def choose(self, label: str, option: str) -> None:
        self.field(label).click()
        self.page.get_by_role("option", name=option, exact=True).click()


def _flow_runs(prefect: str, deployment_id: str) -> list[dict]:
    return _api(f"{prefect}/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})


def _check_form(ui: UI) -> None:
    """The on-demand form: dropdowns, units in labels, no None switches, a step picker per step."""
    page = ui.page
    for label in FORM_SELECTS:
        assert page.get_by_label(f"Select {label}").count() == 1, f"no {label} dropdown"
    for label in ("Max size (MB)", "Max energy (mJ)", "Max latency (ms)"):
        assert ui.field(label).is_visible(), label
    assert page.get_by_text('Property is type "None"').count() == 0
    ui.field("Name").fill(UI_SPEC)
    ui.choose("Runner", "threads")
    ui.field("Max quality drop (metric units)").fill("1")
    page.get_by_role("button", name="Add item").last.click()  # a recipe
    ui.field("Name").fill("kd-ui")
    page.get_by_role("button", name="Add item").first.click()  # its first step
    for kind, selects in STEP_SELECTS.items():
        page.get_by_role("tab", name=kind, exact=True).first.click()
        for label in selects:
            assert page.get_by_label(f"Select {label}").count() >= 1, f"step {kind}: no {label} dropdown"
        ui.shot(f"03-form-step-{kind.lower()}")


def _refused(ui: UI, prefect: str, deployment_id: str) -> None:
    """An out-of-range ratio: an error under the field that names the bound, and no run."""
    ui.page.get_by_role("tab", name="Prune", exact=True).first.click()
    ui.field("Ratio (0-1)").fill("1.5")
    ui.page.get_by_role("button", name="Submit").click()
    ui.page.get_by_text("1.5 is greater than or equal to the maximum of 1").wait_for(timeout=15_000)
    time.sleep(2)  # the UI may still post the run; the server must refuse it
    ui.shot("04-form-refused")
    assert _flow_runs(prefect, deployment_id) == [], "a run was created from an invalid form"


def _submit(ui: UI, prefect: str, deployment_id: str) -> dict:
    """A tiny valid sweep (one short distillation, threads, a loose budget): Submit, and wait for it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    ui.field("Ratio (0-1)").fill("0.5")  # the refused value corrected first, as a user does
    ui.page.get_by_role("tab", name="Distill", exact=True).first.click()
    ui.field("Width (fraction of the teacher)").fill("0.25")
    ui.field("Epochs").fill("3")
    ui.shot("05-form-filled")
    # Prefect 3.9.1's run page checks the errors of the previous validation when Submit is pressed,
    # so after a refused submission the first press only clears them: press again, as a user does.
    # On a loaded machine its validation round trip can take longer: up to six presses, 10 s each.
    answers = []
    for attempt in range(6):
        try:
            with ui.page.expect_response("**/create_flow_run", timeout=10_000) as response:
                ui.page.get_by_role("button", name="Submit").click()
            answers.append(f"{response.value.status}: {response.value.text()[:500]}")
            if response.value.ok:
                break
        except PlaywrightTimeout:
            answers.append("no request")
        ui.shot(f"06-submit-retry-{attempt}")
    deadline = time.monotonic() + 30
    while not (runs := _flow_runs(prefect, deployment_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(runs) == 1, f"Submit created no run; the server answered: {answers}"
    return runs[0]


def _wait_done(prefect: str, run_id: str, timeout: float = 420) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _api(f"{prefect}/flow_runs/{run_id}")
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not finish within {timeout:.0f}s")


def _check_run_pages(ui: UI, base: str, prefect: str, run: dict) -> None:
    """The run's artifacts: the summary (the winner) and the variants table."""
    ui.open(f"{base}/v2/runs/flow-run/{run['id']}", run["name"])
    ui.shot("07-flow-run")
    artifacts = {a["key"]: a for a in _api(f"{prefect}/artifacts/filter",
                                           {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})}
    assert {"summary", "variants"} <= set(artifacts), sorted(artifacts)
    assert "search" not in artifacts, json.dumps(run["parameters"])  # recipes and an untouched search section (defaults filled in): recipes only
    ui.open(f"{base}/v2/artifacts/artifact/{artifacts['summary']['id']}", "kd-ui")
    ui.shot("08-artifact-summary")
    ui.open(f"{base}/v2/artifacts/artifact/{artifacts['variants']['id']}", "kd-ui")
    assert ui.page.get_by_text("teacher").count() >= 1
    ui.shot("09-artifact-variants")


def _check_mlflow(ui: UI, mlflow: str) -> None:
    """The experiment lists the sweep's runs with their metrics; the model page shows the champion."""
    exp = _api(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name={UI_SPEC}")["experiment"]
    found = _api(f"{mlflow}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    variant = next(r for r in found if r["info"].get("run_name") == "kd-ui")
    metrics = re.compile("^(" + "|".join(re.escape(m["key"]) for m in variant["data"]["metrics"]) + ")$")
    # MLflow 3.17 opens an experiment in a fresh browser in its GenAI mode (the browser's choice, not the
    # experiment's tag); this is the runs page its "Model training" switch leads to, as charts of every metric.
    runs = f"{mlflow}/#/experiments/{exp['experiment_id']}/runs?workflowType=machine_learning&compareRunsMode=CHART"
    ui.open(runs, UI_SPEC, timeout=60_000)
    ui.page.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # the sweep's child runs
    ui.page.get_by_text("kd-ui").first.wait_for(timeout=15_000)
    ui.page.get_by_text(metrics).first.wait_for(state="attached", timeout=15_000)  # a chart per metric
    ui.shot("10-mlflow-experiment")
    ui.open(f"{mlflow}/#/models/{UI_MODEL}", UI_MODEL, timeout=60_000)
    ui.page.get_by_text("champion").first.wait_for(timeout=15_000)
    ui.shot("11-mlflow-model")


def _start_ui_run(ui: UI, base: str) -> tuple[str, str]:
    """The Prefect UI at the printed address: the deployments, then the on-demand form up to Submit.
    Returns the API URL and the submitted flow run's id."""
    settings = _api(f"{base}/ui-settings")
    assert settings["api_url"] == f"{base}/api", settings
    prefect = settings["api_url"]
    deployments = {d["name"]: d for d in _api(f"{prefect}/deployments/filter", {})}
    ui.open(base, "Dashboard")
    ui.open(f"{base}/v2/deployments", "on-demand")
    for name in ("nightly", "on-demand", "promote"):
        assert ui.page.get_by_text(name, exact=True).count() >= 1, name
    ui.shot("01-deployments")
    dep_id = deployments["on-demand"]["id"]
    ui.open(f"{base}/v2/deployments/deployment/{dep_id}/run", "Max size (MB)")
    ui.shot("02-form")
    _check_form(ui)
    _refused(ui, prefect, dep_id)
    return prefect, _submit(ui, prefect, dep_id)["id"]


def _open_browser(stack: contextlib.ExitStack, screens: Path) -> UI | None:
    """A headless Chromium page, or None (with a warning) where none can run; in CI that fails instead."""
    missing = _browser_missing()
    if missing and os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"The browser checks of the stack need a browser: {missing}.")
    if missing:
        warnings.warn(f"Browser checks of the stack skipped: {missing}.", stacklevel=2)
        return None
    from playwright.sync_api import sync_playwright

    browser = stack.enter_context(sync_playwright()).chromium.launch(executable_path=str(CHROMIUM))
    stack.callback(browser.close)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(30_000)
    return UI(page, screens)


def test_stack_up_run_pull_down(tmp_path, digits_teacher):
    base = _free_base()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "SHRINKFLOW_"))}
    env |= {"SHRINKFLOW_HOME": str(tmp_path / "home"), "SHRINKFLOW_STACK_BASE_PORT": str(base),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    up = sf(["stack", "up"], env, tmp_path)
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        for name in ("s3", "prefect", "mlflow", "worker"):  # progress as each component comes up
            assert f"{name}: up (" in up.stdout, up.stdout
        exports = dict(line.strip().removeprefix("export ").split("=", 1) for line in up.stdout.splitlines()
                       if line.strip().startswith("export "))
        assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{base + 1}"
        state = json.loads((tmp_path / "home" / "stack" / "state.json").read_text())
        pids = {k: v["pid"] for k, v in state.items() if k != "env"}
        assert set(pids) == {"s3", "prefect", "mlflow", "worker"}

        again = sf(["stack", "up"], env, tmp_path)  # idempotent: nothing restarted
        assert again.returncode == 0
        state = json.loads((tmp_path / "home" / "stack" / "state.json").read_text())
        assert {k: v["pid"] for k, v in state.items() if k != "env"} == pids
        assert sf(["stack", "status"], env, tmp_path).returncode == 0

        client = {**env, **exports}
        # the session's trained teacher, where a first sweep would have cached it (this test is about the stack)
        seed_digits_teacher(digits_teacher, client, exports["SHRINKFLOW_ARTIFACT_STORE"])
        with contextlib.ExitStack() as browser:
            ui = _open_browser(browser, tmp_path / "screens")
            try:
                _cli_and_ui(ui, base, tmp_path, client, exports)
            except BaseException:
                if ui:
                    ui.shot("zz-failure")
                raise
    finally:
        down = sf(["stack", "down"], env, tmp_path)
    assert down.returncode == 0 and "stopped: worker, mlflow, prefect, s3" in down.stdout
    for pid in pids.values():
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert (tmp_path / "home" / "stack" / "mlflow.db").exists() and (tmp_path / "home" / "stack" / "s3").exists()
    status = sf(["stack", "status"], env, tmp_path)
    assert status.returncode == 1 and all(f"{name:8s} DOWN" in status.stdout for name in pids), status.stdout


def _cli_and_ui(ui: UI | None, base: int, tmp_path: Path, client: dict, exports: dict) -> None:
    """A sweep submitted from the Prefect UI runs on the stack's worker while one runs from the CLI;
    then the UI run's pages in Prefect and MLflow."""
    web = f"http://127.0.0.1:{base}"
    if ui:
        prefect, run_id = _start_ui_run(ui, web)
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: stack\ndevice: phone\nrunner: threads\nbudget: {max_quality_drop: 1.0}\nrecipes:\n"
                    "  - name: kd-w25\n    steps: [{kind: distill, width: 0.25, epochs: 5}]\n")
    run = sf(["run", str(spec)], client, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "s3://shrinkflow/models/digits-phone/v1/manifest.json" in run.stdout
    pulled = sf(["pull", "--device", "phone", "--out", str(tmp_path / "pulled")], client, tmp_path)
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    assert json.loads((tmp_path / "pulled" / "manifest.json").read_text())["registry_name"] == "digits-phone"
    cas = subprocess.run([sys.executable, "-c", CAS_CHECK], env=client, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert cas.returncode == 0 and cas.stdout.split() == ["refused", "refused", "moved"], cas.stdout + cas.stderr[-2000:]
    if ui:
        run = _wait_done(prefect, run_id)
        assert run["state"]["type"] == "COMPLETED", run["state"]
        _check_run_pages(ui, web, prefect, run)
        _check_mlflow(ui, exports["MLFLOW_TRACKING_URI"])
