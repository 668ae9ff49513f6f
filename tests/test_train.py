from __future__ import annotations

import numpy as np
import torch

from automation.config import TrainConfig
from automation.device import select_device
from automation.job import fingerprint
from automation.train import train_model
from models import digits_cnn, digits_mlp
from models.datasets import digits

DEVICE = select_device()


def _accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def test_split_is_seeded_and_test_never_trained_on() -> None:
    a, b, other = digits(seed=0), digits(seed=0), digits(seed=1)
    assert fingerprint(a.x_test, a.y_test) == fingerprint(b.x_test, b.y_test)
    assert fingerprint(a.x_test, a.y_test) != fingerprint(other.x_test, other.y_test)
    assert len(a.x_train) + len(a.x_val) + len(a.x_test) == 1797
    train_rows = {row.tobytes() for row in a.x_train}
    overlap = sum(row.tobytes() in train_rows for row in a.x_test)
    # digits has a few exact duplicate images; the split itself must not leak rows
    assert overlap <= 3


def test_training_is_deterministic_and_learns() -> None:
    splits = digits(seed=0)
    cfg = TrainConfig(epochs=8, batch_size=32, lr=3e-3)
    first = train_model(digits_mlp.build, {"hidden": 32}, splits, cfg, device=DEVICE)
    second = train_model(digits_mlp.build, {"hidden": 32}, splits, cfg, device=DEVICE)
    for p, q in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)
        assert p.device.type == "cpu" and p.dtype == torch.float32   # returned across the device boundary
    assert len(first.history) == 8 and first.world_size == 1 and first.device == str(DEVICE.torch)
    assert first.precision == ("bf16 autocast" if DEVICE.is_cuda else "fp32")
    assert first.history[-1]["train_loss"] < first.history[0]["train_loss"]
    assert _accuracy(first.model, splits.x_test, splits.y_test) > 0.85


def test_early_stopping_restores_best_epoch() -> None:
    splits = digits(seed=0)
    # a learning rate this high makes validation loss bounce, so patience 1 stops early
    result = train_model(digits_cnn.build, {"channels": 4, "hidden": 16}, splits,
                         TrainConfig(epochs=40, lr=0.05, patience=1), device=DEVICE)
    assert result.stopped_early
    assert len(result.history) < 40
    best = min(range(len(result.history)), key=lambda i: result.history[i]["val_loss"]) + 1
    assert result.best_epoch == best


def test_ddp_on_two_cpu_processes_with_gloo() -> None:
    splits = digits(seed=0)
    seen: list[int] = []
    result = train_model(digits_mlp.build, {"hidden": 32}, splits, TrainConfig(epochs=6, lr=3e-3),
                         world_size=2, backend="gloo", on_epoch=lambda epoch, _m: seen.append(epoch))
    assert result.world_size == 2
    assert seen == list(range(1, len(result.history) + 1))
    assert _accuracy(result.model, splits.x_test, splits.y_test) > 0.8
