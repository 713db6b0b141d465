import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset


class ToyCNN(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.fc1 = nn.Linear(2 * c * 16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):  # (B, 1, 8, 8) -> (B, 4)
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return ToyCNN().eval()


@pytest.fixture
def example():
    torch.manual_seed(1)
    return (torch.randn(1, 1, 8, 8),)


@pytest.fixture
def toy_data():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(128, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, :4].mean(dim=(1, 2)) > 0).long()
    return TensorDataset(x, y)
