"""Dataset loaders shared by the zoo. Each returns deterministic, seeded splits."""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np


@dataclass(frozen=True)
class Splits:
    """Train/validation/test arrays. The test split is never trained on."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    features: tuple[str, ...] | None = None   # column names of tabular examples, when the data has them

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def split_arrays(
    x: np.ndarray, y: np.ndarray, *, classes: tuple[str, ...], seed: int,
    val_fraction: float, test_fraction: float,
) -> Splits:
    """Stratified, seeded split; the same seed always yields the same test set."""
    from sklearn.model_selection import train_test_split

    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction / (1 - test_fraction),
        random_state=seed, stratify=y_rest)
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test, classes)


def digits(seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.2) -> Splits:
    """scikit-learn's 1,797 handwritten 8×8 digits, scaled to [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    return split_arrays(x, y, classes=tuple(str(c) for c in range(10)), seed=seed,
                        val_fraction=val_fraction, test_fraction=test_fraction)
