"""Variants shipped as ExecuTorch programs (runtime="executorch"): lowering, loading, measuring."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from shrinkflow import artifact, pte
from shrinkflow.errors import ArtifactError
from shrinkflow.measure import measure
from shrinkflow.quantize import Int4Embedding, Int8Embedding, quantize
from shrinkflow.specs import QuantSpec, Recipe

pytest.importorskip("executorch", reason="the executorch package (the minilm extra) is not installed")


class TokenEncoder(nn.Module):
    """A tiny text encoder: embedding, two linear layers, mean pooling. (B, L) ids -> (B, 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 64)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).unsqueeze(-1).float()
        hidden = self.fc2(torch.relu(self.fc1(self.emb(ids))))
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


@pytest.fixture
def encoder() -> TokenEncoder:
    torch.manual_seed(0)
    return TokenEncoder().eval()


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_pte_round_trip_any_batch_and_length(encoder):
    packed = artifact.pack(encoder, (ids(1, 7),), dynamic_dims=(0, 1), runtime="executorch")
    assert packed.format == "executorch" and packed.filename == "model.pte.xz"
    shipped = artifact.unpack(packed)
    assert isinstance(shipped, pte.PteProgram) and shipped.max_batch == pte.PTE_MAX_BATCH
    for batch, length in ((1, 3), (5, 11), (pte.PTE_MAX_BATCH + 7, 9)):  # the last is run in slices
        x = ids(batch, length, seed=batch)
        with torch.inference_mode():
            want = encoder(x)
        assert torch.allclose(shipped(x), want, atol=1e-4), (batch, length)


def test_int8_xnnpack_scheme_stays_close_and_is_smaller(encoder):
    example = (ids(1, 7),)
    fp32 = artifact.pack(encoder, example, (0, 1), "executorch")
    model = quantize(encoder, QuantSpec(scheme="int8-dynamic-intx", layers="linear"), example)
    model = quantize(model, QuantSpec(scheme="int4-weight-only", layers="embedding"), example)
    packed = artifact.pack(model, example, (0, 1), "executorch")
    x = ids(8, 12, seed=3)
    with torch.inference_mode():
        cos = nn.functional.cosine_similarity(artifact.unpack(packed)(x), encoder(x)).min()
    assert cos > 0.98
    assert packed.raw_size < 0.5 * fp32.raw_size


@pytest.mark.parametrize("table", [Int8Embedding, Int4Embedding])
def test_quantized_embeddings_lower_with_two_dynamic_dims(table):
    torch.manual_seed(0)
    emb = nn.Embedding(50, 64)
    quantized = table(emb).eval()
    packed = artifact.pack(quantized, (ids(1, 5) % 50,), (0, 1), "executorch")
    x = ids(3, 9, seed=1) % 50
    assert torch.equal(artifact.unpack(packed)(x), quantized(x))


def test_measure_reports_the_program_and_its_planned_memory(encoder):
    example = (ids(1, 7),)
    packed = artifact.pack(encoder, example, (0, 1), "executorch")
    report = measure(encoder, example, packed=packed, repeats=5)
    assert report.artifact_format == "executorch" and report.size_bytes == len(packed.data)
    shipped = artifact.unpack(packed)
    assert shipped.planned_bytes > 0
    assert report.peak_memory_bytes == packed.raw_size + shipped.planned_bytes
    assert report.latency_p50_ms > 0


def test_runtime_only_scheme_needs_its_runtime():
    step = {"kind": "quantize", "scheme": "int8-dynamic-intx", "layers": "linear"}
    with pytest.raises(ValidationError, match=r"steps\[0\].scheme='int8-dynamic-intx' runs only on runtime 'executorch'"):
        Recipe.model_validate({"name": "r", "steps": [step]})
    assert Recipe.model_validate({"name": "r", "steps": [step], "runtime": "executorch"}).runtime == "executorch"
    with pytest.raises(ValidationError, match="runtime"):
        Recipe.model_validate({"name": "r", "steps": [step], "runtime": "tflite"})


def test_damaged_program_is_refused(encoder):
    import lzma

    packed = artifact.pack(encoder, (ids(1, 7),), (0, 1), "executorch")
    raw = bytearray(lzma.decompress(packed.data))
    with pytest.raises(ArtifactError, match="not a loadable ExecuTorch program"):
        artifact.loads(lzma.compress(bytes(raw[: len(raw) // 3])), "executorch")


def test_thread_count_changes_between_calls_keep_results(encoder):
    """ExecuTorch's threadpool is process-wide: resizing it must not leave a loaded program dangling."""
    import threading

    packed = artifact.pack(quantize(encoder, QuantSpec(scheme="int8-dynamic-intx", layers="linear"), (ids(1, 7),)),
                           (ids(1, 7),), (0, 1), "executorch")
    first, second = artifact.unpack(packed), artifact.unpack(packed)
    x = ids(6, 10, seed=5)
    want = first(x)
    got, before = [], torch.get_num_threads()

    def calls() -> None:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            got.extend([first(x), second(x)])

    try:
        worker = threading.Thread(target=calls)  # as in a Dask worker: a thread that is not the main one
        worker.start()
        worker.join()
    finally:
        torch.set_num_threads(before)
    assert len(got) == 8 and all(torch.allclose(g, want, atol=1e-5) for g in got)


def test_the_runtimes_own_logs_go_to_the_debug_log_not_the_terminal(encoder, capsys, caplog):
    """ExecuTorch prints its Info logs to sys.stderr a fragment at a time (a live progress display
    puts each on a line of its own): they belong in ``-v``'s debug log."""
    import logging

    packed = artifact.pack(encoder, (ids(1, 7),), (0, 1), "executorch")
    program, before = artifact.unpack(packed), torch.get_num_threads()
    try:
        with caplog.at_level(logging.DEBUG, logger="shrinkflow.pte"):
            for n in (1, 2):  # each change of thread count resizes the runtime's threadpool, which it logs
                torch.set_num_threads(n)
                program(ids(2, 5))
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert "threadpool.cpp" not in err and "Resetting threadpool" not in err
    said = [r.getMessage() for r in caplog.records if r.name == "shrinkflow.pte"]
    assert any("Resetting threadpool to 2 threads" in m for m in said), said


def test_a_recurrent_model_ships_static_at_batch_1_lowered_once(caplog):
    """A GRU's zero initial state pins the traced batch in ExecuTorch's plan: the program is lowered
    once, static at batch 1 (lowering an unrolled GRU is the slow part), and larger batches run in
    slices with the eager model's results."""
    class Gru(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(5, 8, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.gru(x)[0].mean(1))

    torch.manual_seed(0)
    model, x = Gru().eval(), torch.randn(4, 3, 5)
    with caplog.at_level("DEBUG", logger="shrinkflow.pte"):  # a warning once per model class, debug after
        shipped = pte.PteProgram(pte.to_pte(model, (x,)))
    assert shipped.max_batch == 1
    # said up front (a dynamic program tried first would say how it failed at batch 1)
    assert "runs only the batch it was traced with (a recurrent layer's initial state)" in caplog.text
    with torch.inference_mode():
        assert torch.allclose(shipped(x), model(x), atol=1e-4)
