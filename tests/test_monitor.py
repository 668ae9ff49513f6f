"""`mlgate monitor`: Evidently drift between the production version's training split and a window
of current inputs; a drift CloudEvent on a real Kafka broker when the policy says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from automation.config import load_config
from tests.conftest import error_lines, fast_config, last_json, run_cli, write_config
from triggers.local_broker import TansuBroker
from triggers.intake.drift import parse_event
from triggers.monitor import feature_names

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def promoted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir where digits_mlp version 1 is in production."""
    from triggers.cli import main

    directory = tmp_path_factory.mktemp("monitor")
    config = fast_config(epochs=6)
    config["service"] = {"data_roots": [str(directory)]}   # where the fresh labelled data is written
    path = write_config(directory, config)
    assert main(["--config", str(path), "run", "--model", "digits_mlp"], standalone=False) == 0
    return path


def window_file(directory: Path, shift: bool) -> Path:
    from models.datasets import digits

    x = digits(seed=0).x_test.reshape(-1, 64)
    if shift:   # brighter and noisier, as a new camera would give
        x = np.clip(x * 1.5 + np.random.default_rng(0).normal(0.1, 0.1, x.shape), 0, 1)
    frame = pd.DataFrame(x, columns=feature_names(64))
    frame["timestamp"] = pd.date_range("2026-11-01", periods=len(x), freq="min", tz="UTC")
    path = directory / ("shifted.parquet" if shift else "normal.parquet")
    frame.to_parquet(path)
    return path


def test_no_drift_on_inputs_like_the_training_data(promoted: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")   # would fail loudly if it tried to publish
    window = window_file(promoted.parent, shift=False)
    code, out, err = run_cli(capsys, "--config", str(promoted), "monitor", "--model", "digits_mlp",
                             "--current", str(window), "--json")
    assert code == 0, err
    summary = last_json(out)
    assert summary["drift_share"] < 0.3 and not summary["retrain"] and summary["published_to"] == []
    assert summary["production_version"] == "1" and summary["total_columns"] == 64
    assert Path(summary["report"]).read_text().lower().count("<html") == 1


def test_shifted_inputs_publish_a_drift_event_to_kafka(promoted: Path, kafka_broker: TansuBroker,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from kafka import KafkaConsumer

    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_broker.bootstrap)
    window = window_file(promoted.parent, shift=True)
    fresh = promoted.parent / "fresh.npz"
    np.savez(fresh, x=np.zeros((2, 64), np.float32), y=np.array([0, 1]))
    code, out, err = run_cli(capsys, "--config", str(promoted), "monitor", "--model", "digits_mlp",
                             "--current", str(window), "--data-ref", str(fresh), "--json")
    assert code == 0, err
    summary = last_json(out)
    assert summary["retrain"] and summary["drift_share"] >= 0.3
    assert summary["published_to"] == [f"kafka:{kafka_broker.bootstrap}"]
    consumer = KafkaConsumer("mlgate.drift", bootstrap_servers=kafka_broker.bootstrap, group_id=None,
                             auto_offset_reset="earliest", consumer_timeout_ms=15_000)
    record = next(iter(consumer))
    consumer.close()
    event = parse_event(record.value, load_config(promoted))        # the consumer's own validation
    assert event.id == summary["event_id"] and event.data.model == "digits_mlp"
    assert event.data.data_ref == str(fresh) and event.data.drift_share == pytest.approx(summary["drift_share"])
    assert len(event.data.drifted_columns) == summary["drifted_columns"] > 0
    assert str(event.data.window_start).startswith("2026-11-01")
    assert record.key == b"digits_mlp"


def test_monitor_errors_are_one_line(promoted: Path, capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "--config", str(promoted), "monitor", "--model", "digits_mlp",
                           "--current", str(tmp_path / "nope"))
    assert code == 2 and error_lines(err) == [f"Error: current data {tmp_path / 'nope'} does not exist"]
    window = window_file(tmp_path, shift=False)
    code, _, err = run_cli(capsys, "--config", str(promoted), "monitor", "--model", "digits_cnn",
                           "--current", str(window))
    assert code == 1 and error_lines(err)[0].startswith("Error: digits_cnn has no production version yet")
    assert len(error_lines(err)) <= 2 and "Traceback" not in err
