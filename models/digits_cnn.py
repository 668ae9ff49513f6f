"""A small convolutional network on 8×8 handwritten digits."""

from torch import nn

from models.datasets import digits as load_data

__all__ = ["build", "load_data"]


def build(channels: int = 16, hidden: int = 64, dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, channels, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),                                   # 8×8 → 4×4
        nn.Flatten(),
        nn.Linear(2 * channels * 16, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, 10),
    )
