import pytest
import torch
from torch import nn

from shrinkflow.distill import content_hash, distill, feature_loss, kd_loss, teacher_outputs
from shrinkflow.specs import DistillSpec
from shrinkflow.workloads import accuracy


def test_kd_loss_matches_hinton_definition():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    T, alpha = 3.0, 0.6
    p_t = torch.softmax(t / T, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / T, -1))).sum(-1).mean()
    expected = alpha * T * T * kl + (1 - alpha) * nn.functional.cross_entropy(s, y)
    assert kd_loss(s, t, y, T, alpha).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kd_loss(t, t, None, T, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_feature_losses():
    a = torch.randn(4, 8)
    assert feature_loss(a, a, "mse").item() == 0.0
    assert feature_loss(a, 2 * a, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert feature_loss(a, -a, "cosine").item() == pytest.approx(2.0, abs=1e-6)


def test_teacher_runs_once_then_cache_hits(toy, toy_data, tmp_path):
    calls = []
    toy.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    first = teacher_outputs(toy, toy_data.tensors[0], tmp_path, batch_size=50)
    assert first.forward_samples == 128 and sum(calls) == 128
    again = teacher_outputs(toy, toy_data.tensors[0], tmp_path)
    assert again.forward_samples == 0 and sum(calls) == 128  # no new forward pass
    assert again.key == first.key and torch.equal(again.outputs, first.outputs)


def test_cache_key_changes_with_teacher_or_data(toy, toy_data):
    x = toy_data.tensors[0]
    key = content_hash(toy, x)
    assert content_hash(toy, x[:-1]) != key
    with torch.no_grad():
        toy.fc2.bias[0] += 1e-3
    assert content_hash(toy, x) != key


def test_distilled_student_learns_from_teacher(toy_data):
    from tests.unit.conftest import ToyCNN

    torch.manual_seed(0)
    teacher = ToyCNN(16)
    x, y = toy_data.tensors
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        opt.step()
    teacher.eval()
    out = teacher_outputs(teacher, x).outputs
    student = ToyCNN(4)
    base = accuracy(student.eval(), toy_data)
    student = distill(student, out, toy_data, DistillSpec(epochs=30, patience=30, lr=1e-2),
                      lambda m: accuracy(m.eval(), toy_data))
    assert accuracy(student, toy_data) > max(base, 0.6)


def test_teacher_outputs_on_padded_batches_cut_to_their_longest_row_are_the_same():
    class MeanOfTokens(nn.Module):  # ignores padding (id 0), like a masked encoder
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(50, 4)

        def forward(self, ids):
            mask = (ids != 0).unsqueeze(-1).float()
            return (self.emb(ids) * mask).sum(1) / mask.sum(1)

    ids = torch.zeros(40, 30, dtype=torch.long)
    for i in range(40):  # sorted by length, as the workloads keep their splits
        ids[i, : 1 + i // 4] = torch.randint(1, 50, (1 + i // 4,), generator=torch.Generator().manual_seed(i))
    widths = []

    def trim(batch):
        batch = batch[:, : int((batch != 0).sum(1).max())]
        widths.append(batch.shape[1])
        return batch

    full = teacher_outputs(MeanOfTokens(), ids, batch_size=8).outputs
    cut = teacher_outputs(MeanOfTokens(), ids, batch_size=8, trim=trim).outputs
    assert torch.allclose(full, cut) and widths == [2, 4, 6, 8, 10]  # never the padded 30
