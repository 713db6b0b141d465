import pytest
import torch

from shrinkflow import artifact, budget
from shrinkflow.errors import ArtifactError
from shrinkflow.measure import (
    count_macs,
    count_params,
    energy_mj,
    measure,
    rapl_energy_uj,
)
from shrinkflow.select import select
from shrinkflow.specs import Budget, Report, VariantResult, Verdict


def test_measure_reports_every_field(toy, example):
    rep = measure(toy, example, threads_=1, power_w=2.0, quality_fn=lambda m: 0.5, repeats=20)
    assert rep.params == sum(p.numel() for p in toy.parameters())
    assert rep.macs == count_macs(toy, example) > 0
    # conv1: 8*64*9, conv2: 16*64*72, fc1: 256*32, fc2: 32*4
    assert rep.macs == 8 * 64 * 9 + 16 * 64 * 72 + 256 * 32 + 32 * 4
    assert 0 < rep.latency_p50_ms <= rep.latency_p95_ms
    assert rep.peak_memory_bytes > 4 * rep.params  # weights plus live activations
    assert rep.energy_source == "estimated" and rep.energy_mj == pytest.approx(2.0 * rep.latency_p50_ms)
    assert rep.quality == 0.5 and rep.artifact_format == "torch.export"
    assert rep.size_bytes < rep.raw_size_bytes


def test_rapl_counter_is_read_when_present(tmp_path, toy, example):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "energy_uj").write_text("1000\n")
    (tmp_path / "intel-rapl:0:0").mkdir()  # a sub-zone is not counted twice
    (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("999999\n")
    assert rapl_energy_uj(tmp_path) == 1000
    assert rapl_energy_uj(tmp_path / "missing") is None
    # a counter that does not advance falls back to the estimate
    assert energy_mj(toy, example, 0.5, 3.0, rapl_root=tmp_path, calls=2) == (1.5, "estimated")


def test_count_params_sees_zeros(toy):
    with torch.no_grad():
        toy.fc1.weight.zero_()
    total, nonzero = count_params(toy)
    assert total - nonzero == toy.fc1.weight.numel()


def _report(**kw):
    base = dict(size_bytes=1000, raw_size_bytes=2000, params=10, nonzero_params=10, sparsity=0.0, macs=5,
                latency_p50_ms=1.0, latency_p95_ms=2.0, peak_memory_bytes=10_000, energy_mj=1.0,
                energy_source="estimated", threads=1, artifact_format="torch.export", quality=0.9)
    return Report(**(base | kw))


def test_budget_check_names_every_broken_limit():
    limits = Budget(max_size_mb=0.0005, max_latency_ms=2.0, max_quality_drop=0.01)
    verdict = budget.check(_report(), 0.9, 0.95, limits)
    assert not verdict.fits
    misses = {m.limit: m for m in verdict.misses}
    assert set(misses) == {"max_size_mb", "max_quality_drop"}
    assert misses["max_size_mb"].excess == pytest.approx(1.0)
    assert budget.check(_report(), 0.95, 0.95, Budget(max_size_mb=1)).fits


def test_nan_quality_never_fits():
    verdict = budget.check(_report(), float("nan"), 0.95, Budget(max_size_mb=1, max_quality_drop=0.5))
    assert not verdict.fits and [m.limit for m in verdict.misses] == ["max_quality_drop"]


def _variant(name, fits, q, lat=1.0, size=1000, misses=()):
    return VariantResult(name=name, report=_report(quality=q, latency_p50_ms=lat, size_bytes=size),
                         verdict=Verdict(fits=fits, misses=misses))


def test_select_highest_quality_then_latency_then_size():
    res = [_variant("a", True, 0.90), _variant("b", True, 0.95, lat=2.0), _variant("c", True, 0.95, lat=1.0, size=5000),
           _variant("d", True, 0.95, lat=1.0, size=900), _variant("e", False, 0.99)]
    sel = select(res)
    assert sel.winner == "d"
    assert set(sel.fitting) == {"a", "b", "c", "d"}
    assert "e" in sel.pareto_size and "d" in sel.pareto_size and "a" not in sel.pareto_size


def test_nothing_fits_is_a_result_naming_nearest_misses():
    from shrinkflow.specs import Miss

    far = (Miss(limit="max_size_mb", value=10, allowed=1),)
    near = (Miss(limit="max_size_mb", value=1.1, allowed=1),)
    sel = select([_variant("far", False, 0.9, misses=far), _variant("near", False, 0.8, misses=near),
                  VariantResult(name="skipped", skipped="too big")])
    assert sel.winner is None and sel.nearest_misses == ("near", "far")


def test_artifact_roundtrip_and_corruption(toy, example, tmp_path):
    path = artifact.save(artifact.pack(toy, example), tmp_path)
    assert path.name == "model.pt2.xz"
    assert torch.allclose(artifact.load(path)(*example), toy(*example), atol=1e-6)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="not valid xz"):
        artifact.load(path)


def test_packed_bytes_are_reproducible_across_processes(tmp_path):
    import subprocess
    import sys

    code = ("import hashlib, torch; from shrinkflow import artifact; from tests.unit.conftest import ToyCNN;"
            "torch.manual_seed(0); m = ToyCNN().eval(); m(torch.randn(3, 1, 8, 8)) if {extra} else None;"
            "p = artifact.pack(m, (torch.zeros(1, 1, 8, 8),)); print(hashlib.sha256(p.data).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code.format(extra=flag)], capture_output=True, text=True,
                              check=True).stdout.strip().splitlines()[-1] for flag in (True, False)}
    assert len(digests) == 1


def test_malicious_pickle_in_an_artifact_is_refused(toy, example, tmp_path):
    import io
    import lzma
    import pickle
    import zipfile

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    raw = lzma.decompress(artifact.pack(toy, example).data)
    src, out = zipfile.ZipFile(io.BytesIO(raw)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            body = src.read(info)
            if info.filename.endswith("sample_inputs/model.pt"):
                body = pickle.dumps(Boom())  # torch.export.load would unpickle this record
            dst.writestr(info, body)
    evil = lzma.compress(out.getvalue())
    with pytest.raises(ArtifactError, match="not a plain tensor payload"):
        artifact.loads(evil, "torch.export")
    assert not (tmp_path / "pwned").exists()


def test_best_quality_ties_within_tolerance_go_to_the_smallest():
    """A 0.001 accuracy edge does not buy a model 11x larger: within the tolerance, size decides."""
    big, small = _variant("big", True, 0.9500, lat=0.5, size=394_160), _variant("small", True, 0.9490, lat=2.0, size=34_552)
    sel = select([big, small])
    assert sel.winner == "small" and sel.runner_up == "big"
    assert "best-quality" in sel.rule and "smaller" in sel.why and "34.6 kB" in sel.why
    assert select([big, small], tolerance=0.0).winner == "big"  # a strict rule: the higher quality wins


@pytest.mark.parametrize(("objective", "winner"), [("smallest", "s"), ("fastest", "f"), ("lowest-energy", "f"),
                                                    ("best-quality", "q")])
def test_each_objective_picks_its_own_winner(objective, winner):
    res = [_variant("q", True, 0.99, lat=3.0, size=9000), _variant("s", True, 0.90, lat=2.0, size=500),
           _variant("f", True, 0.93, lat=0.5, size=4000)]
    res = [r.model_copy(update={"report": r.report.model_copy(update={"energy_mj": r.report.latency_p50_ms})})
           for r in res]
    sel = select(res, objective)
    assert sel.winner == winner and sel.runner_up is not None and sel.rule.startswith(objective)


def test_objective_outside_the_choices_is_refused_naming_the_field():
    from shrinkflow.errors import SpecError
    from shrinkflow.specs import SweepSpec, parse

    with pytest.raises(SpecError, match="objective"):
        parse(SweepSpec, {"objective": "cheapest"})
    with pytest.raises(SpecError, match="quality_tolerance"):
        parse(SweepSpec, {"quality_tolerance": 2})


def test_xz_takes_the_fast_preset_only_where_the_slow_one_gains_nothing(monkeypatch):
    import lzma
    import random

    monkeypatch.setattr(artifact, "_XZ_PROBE_ABOVE", 2**20)  # probe from 1 MiB, to keep the test fast
    monkeypatch.setattr(artifact, "_XZ_PROBE_SLICE", 64 * 2**10)
    small = torch.zeros(4096, dtype=torch.int8).numpy().tobytes()
    assert artifact.xz(small) == lzma.compress(small, preset=6)
    noise = torch.randn(2**19, generator=torch.Generator().manual_seed(0)).numpy().tobytes()  # 2 MiB of float weights
    packed = artifact.xz(noise)
    assert packed == lzma.compress(noise, preset=0) and lzma.decompress(packed) == noise
    rng = random.Random(0)  # large and compressible (words of a small vocabulary): preset 6 earns its time
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 9))) for _ in range(300)]
    text = " ".join(rng.choice(words) for _ in range(300_000)).encode()
    assert artifact.xz(text) == lzma.compress(text, preset=6)


def test_the_explanation_names_the_best_quality_and_the_true_next_best():
    def v(name, q, kb):
        return _variant(name, True, q, size=int(kb * 1000))

    # outside the tie band the runner-up is the next best quality, not the next smallest
    sel = select([v("a", 0.932, 63), v("b", 0.926, 40), v("c", 0.920, 20)], tolerance=0.005)
    assert sel.winner == "a" and sel.runner_up == "b" and "next best, b (0.9260)" in sel.why
    # inside it, the winner is the smallest, and the variant that set the band is named
    sel = select([v("big", 0.828, 300), v("small", 0.824, 60), v("mid", 0.825, 100)], tolerance=0.005)
    assert sel.winner == "small" and sel.runner_up == "mid"
    assert "smallest of the 3 variants" in sel.why and "big's 0.8280" in sel.why


@pytest.mark.parametrize(("cell", "gates"), [(torch.nn.LSTM, 4), (torch.nn.GRU, 3)])
def test_macs_count_the_gates_of_recurrent_layers(cell, gates):
    class Recurrent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = cell(16, 32, num_layers=2, batch_first=True), torch.nn.Linear(32, 3)

        def forward(self, x):  # (B, T, 16) -> (B, 3)
            return self.head(self.rnn(x)[0][:, -1])

    per_step = gates * ((16 + 32) * 32 + (32 + 32) * 32)  # layer 1 takes the input, layer 2 the hidden state
    assert count_macs(Recurrent().eval(), (torch.randn(2, 20, 16),)) == 2 * 20 * per_step + 2 * 32 * 3


def test_peak_memory_matches_torch_profiler_without_importing_torchs_compiler():
    """The memory profile records what ``torch.profiler.profile`` records, and measuring does not
    import torch._inductor (a second of CPU in every worker); in a fresh process, since this one
    may have imported it already."""
    import subprocess
    import sys

    code = """
import sys, torch
from shrinkflow.measure import peak_activation_bytes
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).eval()
x = torch.randn(16, 64)
ours = peak_activation_bytes(model, (x,))
assert "torch._inductor" not in sys.modules, "measuring imported torch._inductor"
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.inference_mode():
    model(x)
live = peak = 0
for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
    live += ev.self_cpu_memory_usage
    peak = max(peak, live)
print(ours, peak)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    ours, theirs = map(int, out.stdout.split()[-2:])
    assert ours == theirs >= 16 * 512 * 4  # the hidden activation is live at the peak
