"""`mlgate monitor`: Evidently drift between the production version's training split and a window
of current inputs; a drift CloudEvent on a real Kafka broker when the policy says so. The tests after
the trained ones give the monitor a logged reference file directly (no training): real feature names,
windows too small to test, and the bounded set of HTML reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from automation.config import load_config
from tests.conftest import error_lines, fast_config, last_json, run_cli, write_config
from triggers.local_broker import TansuBroker
from triggers.drift.events import parse_event
from automation.errors import UsageError
from triggers.drift import monitor
from triggers.drift.monitor import feature_names, load_window, read_reference, run_monitor


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# --- a logged reference with feature names, given to the monitor without training ---------------------------

WINE = ["alcohol", "malic_acid", "magnesium", "proline"]          # scales from 1 to 1,000, as in the wine data


def wine_like(rows: int, seed: int, shift: str | None = None) -> np.ndarray:
    x = np.random.default_rng(seed).normal([13, 2.3, 100, 750], [0.8, 1.1, 14, 300], (rows, len(WINE)))
    if shift:
        x[:, WINE.index(shift)] *= 1.6
    return x


@pytest.fixture
def named_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config whose production digits_mlp version 3 has a logged `train.npz` with named features, read by the
    monitor's own reader; returns the config path."""
    reference = tmp_path / "train.npz"                              # as automation/job.py logs it
    np.savez_compressed(reference, x=wine_like(400, seed=1), features=np.array(WINE, dtype=str))
    monkeypatch.setattr(monitor, "load_reference", lambda config, model: read_reference(reference, "3"))
    config = fast_config()
    config["models"]["digits_mlp"]["drift"] = {"threshold": 0.25, "min_window_rows": 100, "keep_reports": 2}
    return write_config(tmp_path, config)


def current_frame(rows: int, seed: int, shift: str | None = None) -> pd.DataFrame:
    """The inference log's columns: the features by name (in another order), prediction, version, timestamp,
    label."""
    frame = pd.DataFrame(wine_like(rows, seed, shift), columns=WINE)[list(reversed(WINE))]
    frame["prediction"] = np.arange(rows) % 3
    frame["version"] = "3"
    frame["timestamp"] = pd.date_range("2026-11-01", periods=rows, freq="min", tz="UTC")
    frame["label"] = np.array(["barolo", "grignolino", "barbera"])[frame["prediction"]]
    return frame


class Published:
    """Stands in for Kafka/HTTP: records the events the monitor publishes."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict, topic: str, bootstrap: str | None, post_url: str | None) -> list[str]:
        self.events.append(event)
        return [f"kafka:{bootstrap}"]


def test_feature_names_reach_the_drift_result_and_the_event(named_reference: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    published = Published()
    monkeypatch.setattr(monitor, "publish_event", published)
    current = tmp_path / "current.parquet"
    current_frame(300, seed=2, shift="magnesium").to_parquet(current)
    summary = run_monitor(load_config(named_reference), "digits_mlp", current, kafka_bootstrap="broker:9092")
    assert summary["tested"] and summary["production_version"] == "3"
    assert summary["total_columns"] == 4 and summary["drifted_columns"] == 1 and summary["retrain"]
    assert summary["published_to"] == ["kafka:broker:9092"] and len(published.events) == 1
    event = published.events[0]
    assert [c["column"] for c in event["data"]["drifted_columns"]] == ["magnesium"]
    assert event["id"] == summary["event_id"]
    assert str(event["data"]["window_start"]).startswith("2026-11-01")
    html = Path(summary["report"]).read_text(encoding="utf-8")
    assert all(name in html for name in WINE)                         # Evidently's report names them too


def test_compute_drift_names_the_columns(tmp_path: Path) -> None:
    reference = wine_like(300, seed=1)
    result = monitor.compute_drift(reference, wine_like(300, seed=2, shift="proline"), tmp_path / "r.html", WINE)
    assert [c["column"] for c in result.columns] == ["proline"] and result.total_columns == 4
    unnamed = monitor.compute_drift(reference, wine_like(300, seed=2, shift="proline"), tmp_path / "u.html")
    assert [c["column"] for c in unnamed.columns] == ["x3"]          # a reference without names


def test_reference_without_names_reads_positional_columns(tmp_path: Path) -> None:
    logged = tmp_path / "train.npz"                                  # images: an empty array of names
    np.savez_compressed(logged, x=np.zeros((5, 64), np.float32), features=np.array([], dtype=str))
    assert read_reference(logged, "1").names == feature_names(64)
    old = tmp_path / "old.npz"                                       # logged before names were
    np.savez_compressed(old, x=np.zeros((5, 8, 8), np.float32))
    assert read_reference(old, "1").names == feature_names(64)
    named = tmp_path / "named.npz"
    np.savez_compressed(named, x=np.zeros((5, 4)), features=np.array(WINE, dtype=str))
    assert read_reference(named, "2").names == WINE


def test_current_data_is_read_by_name(tmp_path: Path) -> None:
    frame = current_frame(20, seed=2)
    frame.to_csv(tmp_path / "named.csv", index=False)
    window = load_window(tmp_path / "named.csv", 1000, WINE)
    assert np.allclose(window.x, frame[WINE].to_numpy(np.float32))   # the reference's order, extras ignored
    frame.drop(columns=["magnesium"]).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(UsageError) as error:
        load_window(tmp_path / "short.csv", 1000, WINE)
    message = str(error.value)
    assert "magnesium" in message and str(tmp_path / "short.csv") in message and "\n" not in message
    np.savez(tmp_path / "positional.npz", x=frame[WINE].to_numpy())   # .npz stays positional
    assert np.allclose(load_window(tmp_path / "positional.npz", 1000, WINE).x, frame[WINE].to_numpy(np.float32))


def test_a_window_below_min_window_rows_is_not_tested(named_reference: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    published = Published()
    monkeypatch.setattr(monitor, "publish_event", published)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    current = tmp_path / "small.parquet"
    current_frame(15, seed=2, shift="magnesium").to_parquet(current)   # drifted, but too few rows to say
    code, out, err = run_cli(capsys, "--config", str(named_reference), "monitor", "--model", "digits_mlp",
                             "--current", str(current), "--json")
    assert code == 0, err
    summary = last_json(out)
    assert summary["tested"] is False and summary["drift_share"] is None and not summary["retrain"]
    assert summary["drifted"] == []
    assert summary["note"] == "window of 15 rows is below drift.min_window_rows (100): not tested"
    assert summary["published_to"] == [] and summary["report"] is None and published.events == []
    assert not list((tmp_path / "state" / "monitor").rglob("drift-*"))   # no Evidently report built
    code, out, err = run_cli(capsys, "--config", str(named_reference), "monitor", "--model", "digits_mlp",
                             "--current", str(current))
    assert code == 0 and out.strip().splitlines() == [
        "digits_mlp v3: window of 15 rows is below drift.min_window_rows (100): not tested"]


def test_only_the_newest_keep_reports_reports_are_kept(named_reference: Path, tmp_path: Path) -> None:
    config = load_config(named_reference)                            # keep_reports: 2
    current = tmp_path / "current.parquet"
    current_frame(150, seed=2).to_parquet(current)
    reports = [run_monitor(config, "digits_mlp", current, publish=False)["report"] for _ in range(4)]
    assert len(set(reports)) == 4
    directory = config.workdir / "monitor" / "digits_mlp"
    assert sorted(directory.glob("drift-*.html")) == sorted(Path(r) for r in reports[-2:])
    assert sorted(directory.glob("drift-*.json")) == sorted(Path(r).with_suffix(".json") for r in reports[-2:])


def test_monitor_json_names_what_moved_with_score_and_threshold(named_reference: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(monitor, "publish_event", Published())
    current = tmp_path / "moved.parquet"
    current_frame(300, seed=2, shift="magnesium").to_parquet(current)
    code, out, err = run_cli(capsys, "--config", str(named_reference), "monitor", "--model", "digits_mlp",
                             "--current", str(current), "--json")
    assert code == 0, err
    summary = last_json(out)
    assert [c["column"] for c in summary["drifted"]] == ["magnesium"] == [summary["drifted"][0]["column"]]
    moved = summary["drifted"][0]
    assert set(moved) == {"column", "method", "score", "threshold"}
    assert isinstance(moved["score"], float) and isinstance(moved["threshold"], float)
    # it drifted, so its score is past its threshold in the method's direction
    assert moved["score"] < moved["threshold"] if "p_value" in moved["method"] else moved["score"] >= moved["threshold"]
    code, out, err = run_cli(capsys, "--config", str(named_reference), "monitor", "--model", "digits_mlp",
                             "--current", str(current))
    assert code == 0, err
    assert "moved: magnesium (" in out
