"""Latency that load cannot flip: reference-normalised timing, the host calibration, re-timing."""

from __future__ import annotations

import importlib
import json
import time

import pytest

from shrinkflow import budget
from shrinkflow.specs import Budget, Report

measure = importlib.import_module("shrinkflow.measure")  # the module (the package exports a function of that name)


def spin(ms: float) -> None:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


class Host:
    """A host whose speed the test sets: every call takes ``slow`` times its quiet duration."""

    def __init__(self) -> None:
        self.slow = 1.0
        self.calls = 0

    def model(self, *_):
        self.calls += 1
        if 10 <= self.calls < 45:  # a busy spell over most of the measuring window
            self.slow = 3.0
        else:
            self.slow = 1.0
        spin(0.4 * self.slow)

    def reference(self):
        spin(0.4 * self.slow)


def report_with(lat: measure.Latency) -> Report:
    return Report(quality=0.9, size_bytes=1000, raw_size_bytes=2000, params=10, nonzero_params=10, sparsity=0.0, macs=1,
                  latency_p50_ms=lat.p50_ms, latency_p95_ms=lat.p95_ms, peak_memory_bytes=1, energy_mj=0.1,
                  energy_source="estimated", threads=1, artifact_format="torch.export")


def test_a_slowdown_injected_into_the_measuring_window_leaves_the_verdict_unchanged():
    quiet_host, busy_host = Host(), Host()
    quiet_host.model = lambda *_: spin(0.4)  # never busy
    quiet_host.reference = lambda: spin(0.4)
    limits = Budget(max_latency_ms=0.7)
    verdicts, raws = [], []
    for host in (quiet_host, busy_host):
        timing = measure.timed(host.model, (), warmup=5, repeats=50, reference=host.reference)
        lat = measure.latency(timing, quiet_ms=0.4)
        raws.append(lat.raw_p50_ms)
        verdicts.append(budget.check(report_with(lat), 0.9, 0.9, limits).fits)
        assert lat.p50_ms == pytest.approx(0.4, rel=0.35) and lat.runs == 50
        assert lat.ci_ms[0] <= lat.p50_ms <= lat.ci_ms[1]
    assert raws[1] > 0.7 > raws[0]  # as timed, the busy spell alone would have failed the limit
    assert verdicts == [True, True]


def test_retime_interleaves_the_candidates_each_call_followed_by_the_reference():
    calls: list[str] = []
    candidates = {name: (lambda *_, n=name: calls.append(n), ()) for name in ("a", "b", "c")}
    timings = measure.retime(candidates, rounds=6, warmup=0, reference=lambda: calls.append("ref"))
    assert calls[1::2] == ["ref"] * 18  # the reference right after every model call
    rounds = [calls[0::2][i:i + 3] for i in range(0, 18, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every candidate once per round
    assert [r[0] for r in rounds[:3]] == ["a", "b", "c"]  # the order rotates: nobody always goes first
    assert all(len(t.model_ms) == len(t.reference_ms) == 6 for t in timings.values())


def test_the_host_calibration_only_goes_down_and_is_kept_between_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path))
    monkeypatch.setattr(measure, "_QUIET", {})

    def windows(ms: float) -> measure.Timing:
        return measure.Timing(model_ms=[1.0] * 20, reference_ms=[ms] * 20)

    assert measure.quiet_reference_ms(1, windows(2.0)) == 2.0
    assert measure.quiet_reference_ms(1, windows(1.0)) == 1.0
    assert measure.quiet_reference_ms(1, windows(3.0)) == 1.0  # a busy window does not raise it
    stored = json.loads((tmp_path / "host-reference.json").read_text())
    assert list(stored.values()) == [1.0] and "1 threads" in next(iter(stored))
    monkeypatch.setattr(measure, "_QUIET", {})  # a fresh process reads the file
    assert measure.quiet_reference_ms(1, windows(5.0)) == 1.0
    # another process sharing the home (a sweep's other worker) saw a quieter window since:
    # this process, which knows 1.0 already, scales to that one, with or without a new timing
    key = next(iter(stored))
    (tmp_path / "host-reference.json").write_text(json.dumps({key: 0.5}))
    assert measure.quiet_reference_ms(1) == 0.5
    assert measure.quiet_reference_ms(1, windows(0.8)) == 0.5


def test_with_latency_rescales_an_estimated_energy():
    base = report_with(measure.Latency(2.0, 3.0, (1.5, 2.5), 50, 4.0, 1.0, 1.0))
    new = measure.with_latency(base, measure.Latency(1.0, 1.5, (0.9, 1.1), 30, 1.2, 0.5, 0.5))
    assert new.latency_p50_ms == 1.0 and new.latency_runs == 30 and new.energy_mj == pytest.approx(0.05)


def test_finalists_are_re_timed_only_where_latency_can_decide():
    from shrinkflow.specs import VariantResult
    from tasks.compress import latency_decides

    def variant(p50: float) -> VariantResult:
        lat = measure.Latency(p50, p50, (p50, p50), 50, p50, 0.2, 0.2)
        return VariantResult(name="v", report=report_with(lat).model_copy(update={"energy_mj": 0.001}))

    limits = Budget(max_latency_ms=10.0, max_energy_mj=100.0)
    assert latency_decides(variant(4.0), limits, "best-quality") and latency_decides(variant(25.0), limits, "smallest")
    assert not latency_decides(variant(0.5), limits, "best-quality")  # 20x under the limit: no load flips that
    assert latency_decides(variant(0.5), limits, "fastest")  # the objective ranks by speed
    assert not latency_decides(variant(0.5), Budget(), "best-quality")


def test_a_quieter_calibration_found_later_scales_earlier_figures_alike():
    busy = measure.with_latency(report_with(measure.Latency(80.0, 100.0, (75.0, 85.0), 50, 83.0, 20.6, 20.0)),
                                measure.Latency(80.0, 100.0, (75.0, 85.0), 50, 83.0, 20.6, 20.0))
    quiet = measure.rescaled(busy, 0.25)  # the teacher measured first, while the host was busy
    assert quiet.latency_p50_ms == pytest.approx(1.0) and quiet.latency_ci_ms == pytest.approx((0.9375, 1.0625))
    assert quiet.quiet_reference_ms == 0.25 and quiet.energy_mj == pytest.approx(busy.energy_mj / 80)
    assert measure.rescaled(quiet, 0.5) is quiet  # a slower calibration never inflates a figure


def test_an_executorch_program_is_timed_against_the_reference_in_its_own_runtime(tmp_path, monkeypatch):
    pytest.importorskip("executorch", reason="the executorch package (the minilm extra) is not installed")
    import torch

    from shrinkflow import artifact

    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path))
    monkeypatch.setattr(measure, "_QUIET", {})
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    pte = artifact.unpack(artifact.pack(net, (torch.randn(1, 8),), runtime="executorch"))
    assert measure.reference_for(pte).kind == "xnnpack" and measure.reference_for(net).kind == "torch"
    assert measure.reference_for(pte)().shape == (256, 64)
    report = measure.measure(net, (torch.randn(1, 8),), packed=artifact.pack(net, (torch.randn(1, 8),), runtime="executorch"))
    assert report.quiet_reference_ms and report.latency_runs == 50
    stored = json.loads((tmp_path / "host-reference.json").read_text())
    assert any(key.endswith("reference xnnpack") for key in stored)  # calibrated per runtime


def test_the_longest_input_is_timed_beside_the_typical_one_and_sets_the_peak_memory(tmp_path, monkeypatch):
    """A sequence model is timed at the example's (median) length, which the limit judges, and at
    the longest length users send, which is reported; its peak memory is taken at the longest."""
    import torch

    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(100, 128), torch.nn.Linear(128, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 128)).eval()
    short, long = (torch.randint(0, 100, (1, 8)),), (torch.randint(0, 100, (1, 2048)),)
    from shrinkflow import artifact

    packed = artifact.pack(model, short, (0, 1))  # any batch, any length
    typical = measure.measure(model, short, repeats=20, packed=packed)
    both = measure.measure(model, short, repeats=20, longest=long, packed=packed)
    assert "latency_p50_ms_longest" not in typical.extra
    assert both.extra["latency_p50_ms_longest"] > 5 * both.latency_p50_ms  # 256x the tokens
    assert both.extra["latency_p95_ms_longest"] >= both.extra["latency_p50_ms_longest"]
    # 2048 x 512 float activations alone are 4 MB; the 8-token call's are 16 kB
    assert both.peak_memory_bytes - typical.peak_memory_bytes > 2048 * 512 * 4
    scaled = measure.rescaled(both, both.quiet_reference_ms / 2)  # a quieter calibration scales them alike
    assert scaled.extra["latency_p50_ms_longest"] == pytest.approx(both.extra["latency_p50_ms_longest"] / 2)


def test_a_program_shipped_at_a_fixed_length_is_measured_without_the_longest_figure(tmp_path, monkeypatch):
    import torch

    from shrinkflow import artifact

    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path))
    model = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.Linear(16, 4)).eval()
    short = (torch.randint(0, 100, (1, 8)),)
    fixed = artifact.pack(model, short, (0,))  # the length is fixed at 8: a 64-token input is refused
    report = measure.measure(model, short, repeats=10, packed=fixed, longest=(torch.randint(0, 100, (1, 64)),))
    assert "latency_p50_ms_longest" not in report.extra and report.latency_p50_ms > 0
