from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from automation.config import TrainConfig
from automation.device import select_device
from automation.job import fingerprint
from automation.threads import MAX_DERIVED_THREADS
from automation.train import train_model, training_threads
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


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    first, second = a.state_dict(), b.state_dict()
    assert first.keys() == second.keys()
    for name, tensor in first.items():   # parameters and buffers alike
        assert torch.equal(tensor, second[name]), name


def test_training_is_deterministic_and_learns() -> None:
    splits = digits(seed=0)
    cfg = TrainConfig(epochs=8, batch_size=32, lr=3e-3)
    first = train_model(digits_mlp.build, {"hidden": 32}, splits, cfg, device=DEVICE)
    second = train_model(digits_mlp.build, {"hidden": 32}, splits, cfg, device=DEVICE)
    _assert_same_state(first.model, second.model)
    assert _accuracy(first.model, splits.x_test, splits.y_test) == _accuracy(second.model, splits.x_test, splits.y_test)
    untimed = [[{k: v for k, v in h.items() if k != "epoch_seconds"} for h in r.history] for r in (first, second)]
    assert untimed[0] == untimed[1]
    for p in first.model.parameters():
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


def test_two_processes_with_other_thread_settings_train_the_same_weights() -> None:
    """The job's case: another process, another hash seed, other thread defaults. Training pins its thread
    count (train.threads) and runs torch's deterministic algorithms; both come back afterwards."""
    script = ("import sys, torch\n"
              "from automation.config import TrainConfig\n"
              "from automation.train import train_model\n"
              "from models import digits_cnn\n"
              "from models.datasets import digits\n"
              "torch.set_num_threads(int(sys.argv[1]))   # what the process had before training\n"
              "cfg = TrainConfig(epochs=2, batch_size=64, lr=3e-3, threads=2)\n"
              "result = train_model(digits_cnn.build, {'channels': 4, 'hidden': 16}, digits(seed=0), cfg)\n"
              "assert result.threads == 2 and torch.get_num_threads() == int(sys.argv[1])\n"
              "assert not torch.are_deterministic_algorithms_enabled()\n"
              "torch.save(result.model.state_dict(), sys.argv[2])\n")
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        for threads, name in ((1, "a.pt"), (2, "b.pt")):
            env = {**os.environ, "PYTHONHASHSEED": str(threads)}   # the tokenizer's trainer once hashed its way
            subprocess.run([sys.executable, "-c", script, str(threads), str(Path(tmp) / name)], check=True,
                           cwd=Path(__file__).parents[1], env=env, timeout=300)
        a, b = (torch.load(Path(tmp) / n, weights_only=True) for n in ("a.pt", "b.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_runs_on_the_configured_thread_count() -> None:
    splits = digits(seed=0)
    result = train_model(digits_mlp.build, {"hidden": 16}, splits, TrainConfig(epochs=1, threads=1))
    assert result.threads == 1
    assert training_threads(TrainConfig(threads=6), world_size=2) == 3   # DDP ranks share them


def test_the_derived_thread_count_follows_the_runner_not_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert training_threads(TrainConfig()) == min(len(os.sched_getaffinity(0)), MAX_DERIVED_THREADS)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")   # a shared machine's share, set by whoever runs the job
    assert training_threads(TrainConfig()) == 3
    assert training_threads(TrainConfig(threads=2)) == 2   # the config wins


def test_the_text_tokenizer_is_the_same_in_every_process() -> None:
    """Hugging Face's WordPiece trainer numbers its '##' pieces in hash-map order, another in every process
    (huggingface/tokenizers#1794): the same articles gave other ids, so the news model trained differently."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("from automation.preprocess import Tokenize\n"
              "from models.datasets import read_bbc_news\n"
              "texts = read_bbc_news()[0][::8]\n"
              "print(Tokenize(vocab_size=2000, max_length=64).fit(texts).tokenizer.to_str())\n")
    fitted = {subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                             cwd=Path(__file__).parents[1], timeout=120).stdout for _ in range(3)}
    assert len(fitted) == 1
