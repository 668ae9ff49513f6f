"""The model contract (automation/contract.py): what a loader may return, what mlgate converts, what it
refuses before any MLflow run, fresh data, and fitted pre-processing that travels with the model."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from automation import contract
from automation.config import SplitConfig
from automation.data import Splits
from models.datasets import digits
from tests.conftest import error_lines, fast_config, last_json, run_cli, wine_frame, write_config
from triggers.cli import main


class Loader:
    """A stand-in model file: attributes a model file may set."""

    def __init__(self, **attributes: object) -> None:
        self.__dict__.update(attributes)


def prepare(raw: object, **attributes: object) -> Splits:
    return contract.prepare_data("m", Loader(**attributes), raw, SplitConfig())


# --- what a loader may return ----------------------------------------------------------------------------

def test_a_dataframe_with_string_labels_and_float64_needs_no_conversion_code() -> None:
    frame = wine_frame()
    assert frame.drop(columns="cultivar").dtypes.eq(np.float64).all() and frame["cultivar"].dtype == object
    splits = prepare(frame, label="cultivar")
    assert splits.x_train.dtype == np.float32 and splits.y_train.dtype == np.int64
    assert splits.classes == ("barbera", "barolo", "grignolino")          # sorted names, kept
    assert splits.features == tuple(c for c in frame.columns if c != "cultivar")
    assert "od280/od315_of_diluted_wines" in splits.features               # names are kept as they are
    total = len(splits.y_train) + len(splits.y_val) + len(splits.y_test)
    assert total == len(frame) and len(splits.y_test) == round(0.2 * len(frame))
    # stratified: every class in every split, and the same seed gives the same test set
    assert all(len(np.unique(y)) == 3 for y in (splits.y_train, splits.y_val, splits.y_test))
    assert np.array_equal(prepare(frame, label="cultivar").x_test, splits.x_test)
    # labels map back to the names they came from
    row = frame.drop(columns="cultivar").to_numpy(np.float32)
    first = int(np.flatnonzero((row == splits.x_test[0]).all(axis=1))[0])
    assert splits.classes[splits.y_test[0]] == frame["cultivar"].iloc[first]


def test_labels_one_to_k_become_indices_named_by_their_code() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(90, 3)), np.repeat([1, 2, 3], 30)
    splits = prepare((x, y))
    assert splits.classes == ("1", "2", "3")
    assert set(np.unique(splits.y_train)) == {0, 1, 2}
    assert splits.features is None                                          # arrays have no names
    integral_floats = prepare((x, y.astype(np.float64)))
    assert integral_floats.classes == ("1", "2", "3")


def test_one_hot_rows_are_single_labels() -> None:
    x = np.random.default_rng(0).normal(size=(60, 2))
    splits = prepare((x, np.eye(3, dtype=np.int64)[np.arange(60) % 3]))
    assert splits.classes == ("0", "1", "2")


def test_a_splits_object_is_used_as_is() -> None:
    given = digits()
    splits = prepare(given)
    assert np.array_equal(splits.x_test, given.x_test) and np.array_equal(splits.y_test, given.y_test)
    assert splits.classes == given.classes and splits.input_shape == (1, 8, 8)


@pytest.mark.parametrize("raw, attributes, expected", [
    ((np.zeros((50, 2)), np.linspace(0, 1, 50)), {}, "continuous values (e.g. 0.0204082), a regression target; "
                                                     "mlgate supports single-label classification"),
    ((np.zeros((50, 2)), (np.arange(150).reshape(50, 3) % 2)), {}, "multi-label"),
    ((np.zeros((50, 2)), np.arange(50)), {}, "50 distinct values in 50 rows: that looks like a regression target"),
    ((np.zeros((50, 2)), np.zeros(50)), {}, "single class ('0')"),
    ((np.zeros((50, 2)), np.zeros(49)), {}, "x has 50 rows but y has 49 labels"),
    ((np.zeros(50), np.zeros(50)), {}, "x has shape [50]"),
    ((pd.DataFrame({"a": ["x"] * 60, "label": [0, 1] * 30}), None), {}, "column 'a' holds object values"),
    (pd.DataFrame({"a": [1.0, np.nan] * 30, "label": [0, 1] * 30}), {}, "30 missing, infinite or out-of-float32-range values (first in 'a')"),
    (pd.DataFrame({"a": [1.0] * 60, "y": [0, 1] * 30}), {}, "no label column 'label'"),
    (pd.DataFrame({"a": [1.0] * 60, "label": [0, 1] * 29 + [2, 3]}), {}, "class '2' has 1 example(s)"),
    ({"x": [1, 2]}, {}, "returned dict; expected (x, y)"),
])
def test_what_cannot_be_converted_is_refused_in_one_line(raw: object, attributes: dict, expected: str) -> None:
    if isinstance(raw, tuple) and raw[1] is None:      # a frame whose label column is fine, x is not
        raw = raw[0]
    with pytest.raises(contract.ContractError) as caught:
        prepare(raw, **attributes)
    message = str(caught.value)
    assert message.startswith("models.m: load_data(): ") and "\n" not in message
    assert expected in message


# --- fresh data after drift -------------------------------------------------------------------------------

def test_fresh_data_joins_the_training_split_only(tmp_path: Path) -> None:
    frame = wine_frame()
    splits = prepare(frame, label="cultivar")
    fresh = frame.sample(12, random_state=1)
    fresh.to_csv(tmp_path / "fresh.csv", index=False)
    grown = contract.append_fresh(splits, tmp_path / "fresh.csv", label="cultivar")
    assert len(grown.x_train) == len(splits.x_train) + 12
    assert np.array_equal(grown.x_test, splits.x_test) and np.array_equal(grown.x_val, splits.x_val)
    names = [grown.classes[i] for i in grown.y_train[-12:]]
    assert names == list(fresh["cultivar"])
    # an .npz works too, labels as names or as indices
    np.savez(tmp_path / "fresh.npz", x=fresh.drop(columns="cultivar").to_numpy(), y=fresh["cultivar"].to_numpy(str))
    assert np.array_equal(contract.append_fresh(splits, tmp_path / "fresh.npz").y_train, grown.y_train)


@pytest.mark.parametrize("write, expected", [
    (lambda p, f: f.assign(cultivar="merlot").to_csv(p / "f.csv", index=False), "label 'merlot' is not one of"),
    (lambda p, f: f.drop(columns="alcohol").to_csv(p / "f.csv", index=False), "missing feature column 'alcohol'"),
    (lambda p, f: np.savez(p / "f.npz", x=np.zeros((3, 5)), y=np.zeros(3)), "x has shape [3, 5]"),
    (lambda p, f: (p / "f.json").write_text("{}"), "expected one of .npz, .csv, .parquet"),
])
def test_bad_fresh_data_is_refused_in_one_line(tmp_path: Path, write: object, expected: str) -> None:
    frame = wine_frame()
    splits = prepare(frame, label="cultivar")
    write(tmp_path, frame.head(3))
    path = next(tmp_path.iterdir())
    with pytest.raises(contract.ContractError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        contract.append_fresh(splits, path, label="cultivar")


# --- pre-processing ---------------------------------------------------------------------------------------

def test_preprocessing_is_fitted_on_the_training_split_only() -> None:
    splits = prepare(wine_frame(), label="cultivar")
    step = contract.fit_preprocess("m", Loader(preprocess="standardize"), splits.x_train)
    assert np.allclose(step.shift.numpy(), splits.x_train.mean(axis=0), rtol=1e-5)
    assert np.allclose(step.scale.numpy(), splits.x_train.std(axis=0), rtol=1e-4)
    everything = np.concatenate([splits.x_train, splits.x_val, splits.x_test])
    assert not np.allclose(step.shift.numpy(), everything.mean(axis=0), rtol=1e-5)
    scaled = step(torch.from_numpy(splits.x_train)).numpy()
    assert np.allclose(scaled.mean(axis=0), 0, atol=1e-4) and np.allclose(scaled.std(axis=0), 1, atol=1e-3)
    assert not list(step.parameters())                                      # statistics are never trained


def test_channel_normalization_and_unknown_steps() -> None:
    x = np.random.default_rng(0).normal(loc=3, scale=2, size=(40, 2, 4, 4)).astype(np.float32)
    step = contract.fit_preprocess("m", Loader(preprocess="normalize_channels"), x)
    assert step.shift.shape == (2, 1, 1)
    with pytest.raises(contract.ContractError, match="unknown step 'zscore' .known: standardize, minmax"):
        contract.fit_preprocess("m", Loader(preprocess="zscore"), x)


# --- whole jobs -------------------------------------------------------------------------------------------

def wine_config(directory: Path, **model: object) -> Path:
    csv = directory / "wine.csv"
    wine_frame().to_csv(csv, index=False)
    config = fast_config(epochs=60)
    config["defaults"]["train"].update(batch_size=16, patience=60)
    config["defaults"].setdefault("optimize", {})["probe_margin"] = None   # every variant measured: parity is the point
    config["models"] = {"wine": {"module": "tests.fixtures.wine_model", "data": {"path": str(csv)},
                                 "params": {"hidden": 32}, **model}}
    return write_config(directory, config)


@pytest.fixture(scope="module")
def wine_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("wine")
    path = wine_config(directory)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["run", "--config", str(path), "--model", "wine", "--json"], standalone=False)
    assert code == 0, out.getvalue()[-2000:]
    return path, last_json(out.getvalue())


def test_a_csv_model_trains_on_raw_inputs_and_its_version_carries_the_names(wine_job: tuple[Path, dict]) -> None:
    path, summary = wine_job
    assert summary["promoted"] and summary["metrics"]["accuracy"] >= 0.9   # 56 % unscaled, per the issue
    from automation import tracking
    from automation.config import load_config
    from automation.predictors import load_registered

    config = load_config(path)
    client, _ = tracking.connect(config.workdir, config.experiment)
    loaded = load_registered(client, "wine", summary["version"], path.parent / "download")
    assert loaded.classes == ("barbera", "barolo", "grignolino")
    assert loaded.features[0] == "alcohol" and len(loaded.features) == 13
    # the registered artifact takes raw inputs: the scaler is inside it
    frame = wine_frame()
    raw = frame.drop(columns="cultivar").to_numpy(np.float32)
    predicted = [loaded.classes[i] for i in loaded.predictor.to_numpy(
        loaded.predictor.run(loaded.predictor.prepare(raw))).argmax(1)]
    assert np.mean(np.array(predicted) == frame["cultivar"].to_numpy()) >= 0.9


def test_every_variant_runs_the_same_preprocessing(wine_job: tuple[Path, dict]) -> None:
    """Parity is checked on raw inputs, so an export that dropped or changed the scaler fails it."""
    _, summary = wine_job
    built = {v["name"]: v for v in summary["variants"] if not v["skipped"]}
    assert {"torch_eager", "onnx_fp32", "onnx_int8"} <= set(built)
    assert built["onnx_fp32"]["parity"]["passed"] and built["onnx_fp32"]["parity"]["max_abs_diff"] < 1e-3
    for name in ("onnx_int8", "torch_half"):
        assert built[name]["accuracy"] >= summary["metrics"]["accuracy"] - 0.05


def test_a_fresh_data_retrain_works_with_a_loader_that_takes_no_extra_argument(
        wine_job: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    path, first = wine_job
    fresh = path.parent / "fresh.csv"
    wine_frame().sample(30, random_state=3).to_csv(fresh, index=False)
    code, out, err = run_cli(capsys, "run", "--config", str(path), "--model", "wine", "--trigger", "drift",
                             "--extra-train", str(fresh), "--json")
    summary = last_json(out)
    assert code in (0, 3), error_lines(err)
    assert summary["data_fingerprint"] != first["data_fingerprint"]      # it trained on more data


@pytest.mark.parametrize("task, expected", [
    ("regression", "a regression target; mlgate supports single-label classification"),
    ("multilabel", "multi-label"),
])
def test_unsupported_tasks_are_refused_before_any_mlflow_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             task: str, expected: str) -> None:
    config = fast_config()
    config["models"] = {"bad": {"module": "tests.fixtures.unsupported_tasks", "data": {"task": task}}}
    path = write_config(tmp_path, config)
    code, out, err = run_cli(capsys, "run", "--config", str(path), "--model", "bad")
    lines = error_lines(err)
    assert code == 2
    assert lines[0].startswith("Error: models.bad: load_data(): ") and expected in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "state" / "mlflow.db").exists()              # no run, not even a store


def test_the_csv_model_serves_records_by_name_and_its_drift_report_names_the_columns(
        wine_job: tuple[Path, dict], tmp_path: Path) -> None:
    """The user's journey past the job: records in, class names out, and drift told in the CSV's own names."""
    from fastapi.testclient import TestClient

    from automation.config import load_config
    from triggers.drift.monitor import run_monitor
    from triggers.serving.inference_log import InferenceLog
    from triggers.serving.server import ModelServer, create_serving_app

    path, _ = wine_job
    config = load_config(path)
    server = ModelServer(config, "wine")
    assert server.sync()
    log = InferenceLog(tmp_path / "log", flush_seconds=0.05)
    frame = wine_frame()
    features = frame.drop(columns="cultivar")
    with TestClient(create_serving_app(server, log)) as client:
        answer = client.post("/predict", json={"inputs": features.to_dict(orient="records")})
        assert answer.status_code == 200, answer.text
        labels = answer.json()["labels"]
        assert np.mean(np.array(labels) == frame["cultivar"].to_numpy()) >= 0.9
        # a production window whose proline (about 280..1,680) has tripled
        shifted = features.assign(proline=features["proline"] * 3)
        assert client.post("/predict", json={"inputs": shifted.to_dict(orient="records")}).status_code == 200
    log.close()
    summary = run_monitor(config, "wine", tmp_path / "log", publish=False)
    assert summary["current_rows"] == 2 * len(frame)
    html = Path(summary["report"]).read_text(encoding="utf-8")
    assert "proline" in html and "x12" not in html
    event = json.loads(Path(summary["report"]).with_suffix(".json").read_text(encoding="utf-8"))["event"]
    drifted = {column["column"] for column in event["data"]["drifted_columns"]}
    assert "proline" in drifted and drifted <= set(features.columns)
