"""A two-layer perceptron on 8×8 handwritten digits."""

from torch import nn

from models.datasets import digits as load_data

__all__ = ["build", "load_data"]


def build(hidden: int = 128, dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, 10),
    )
