"""A job's fixed cost: the digits, the stratified split and F1 without importing scikit-learn, and the same
numbers as scikit-learn gives (which the tests may import)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from automation.benchmark import f1_per_class
from automation.data import split_arrays, stratified_split
from models.datasets import digits, digits_arrays


def test_digits_arrays_are_sklearns_load_digits() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, target = digits_arrays()
    assert images.dtype == bunch.images.dtype and images.shape == (1797, 8, 8)
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(target, bunch.target)


LABELS = {
    "digits": digits_arrays()[1],
    "skewed": np.repeat(np.arange(7), [2, 3, 5, 11, 40, 97, 300]),
    "strings": np.array(["b", "a", "c", "a", "b", "c", "a", "a", "b", "c", "c", "c", "a", "b"] * 9, dtype=object),
    "ties": np.repeat(np.arange(4), [7, 7, 7, 6]),
}


@pytest.mark.parametrize("name", sorted(LABELS))
@pytest.mark.parametrize("seed", [0, 1, 42])
@pytest.mark.parametrize("size", [{"test_size": 0.2}, {"test_size": 0.15 / 0.8}, {"test_size": 0.5},
                                  {"test_size": 11}, {"train_size": 13}, {"train_size": 60}])
def test_stratified_split_picks_sklearns_rows(name: str, seed: int, size: dict) -> None:
    from sklearn.model_selection import train_test_split

    y = LABELS[name]
    try:
        expected = train_test_split(np.arange(len(y)), random_state=seed, stratify=y, **size)
    except ValueError:   # a size this label set cannot take: refused too
        with pytest.raises(ValueError):
            stratified_split(y, seed=seed, **size)
        return
    got = stratified_split(y, seed=seed, **size)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_stratified_split_is_stratified_deterministic_and_disjoint() -> None:
    y = LABELS["skewed"]
    train, test = stratified_split(y, test_size=0.2, seed=3)
    again = stratified_split(y, test_size=0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(test, stratified_split(y, test_size=0.2, seed=4)[1])
    assert len(set(train) | set(test)) == len(y) and not set(train) & set(test)
    share = np.bincount(y[test], minlength=7) / np.bincount(y, minlength=7)
    assert np.all(np.abs(share[y.max() - 3:] - 0.2) < 0.05)   # each populous class gives ~20 % to the test set
    assert set(np.unique(y[train])) == set(range(7))         # even the 2-example class trains
    with pytest.raises(ValueError, match="2 examples"):
        stratified_split(np.array([0, 0, 1]), test_size=0.5, seed=0)


def test_split_arrays_matches_sklearns_two_step_split() -> None:
    from sklearn.model_selection import train_test_split

    x, y = np.arange(len(LABELS["digits"])) * 10, LABELS["digits"]
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.2, random_state=5, stratify=y)
    x_train, x_val, *_ = train_test_split(x_rest, y_rest, test_size=0.15 / 0.8, random_state=5, stratify=y_rest)
    got = split_arrays(x, y, classes=(), seed=5, val_fraction=0.15, test_fraction=0.2)
    for mine, theirs in ((got.x_train, x_train), (got.x_val, x_val), (got.x_test, x_test)):
        np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(got.y_test, y[got.x_test // 10])


def test_f1_per_class_is_sklearns() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 500)
    predicted = np.where(rng.random(500) < 0.7, y, rng.integers(0, 5, 500))   # class 5 is never predicted
    y[y == 4] = 3                                                              # class 4: predicted, never true
    for classes in (6, 7):                                                     # 6: absent from both
        expected = f1_score(y, predicted, labels=range(classes), average=None, zero_division=0)
        np.testing.assert_array_equal(f1_per_class(y, predicted, classes), expected)


def test_digits_job_data_imports_no_sklearn() -> None:
    code = ("import sys; from models.datasets import digits; from automation import benchmark; s = digits(); "
            "benchmark.f1_per_class(s.y_test, s.y_test, 10); "
            "assert 'sklearn' not in sys.modules, 'sklearn imported'; print(len(s.y_train), len(s.y_test))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(len(digits().y_train)), "360"]


def test_a_new_embedded_store_is_a_copy_of_the_template_as_mlflow_makes_it(tmp_path, monkeypatch) -> None:
    import sqlite3

    from mlflow import MlflowClient

    from automation import tracking

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    own = f"sqlite:///{tmp_path / 'own.db'}"
    MlflowClient(own, own).search_experiments()   # what MLflow itself makes here
    for workdir in (tmp_path / "first", tmp_path / "second"):
        client, experiment_id = tracking.connect(workdir, "mlgate")   # MLflow opens it: its schema check runs
        assert client.get_experiment(experiment_id).name == "mlgate"
    assert tracking.template_store().parent == tmp_path / "cache" / "mlgate" / "mlflow"

    def described(path):   # tables, columns and indexes (MLflow's own CREATE statements vary in constraint order)
        with sqlite3.connect(path) as db:
            objects = db.execute("SELECT type, name FROM sqlite_master ORDER BY type, name").fetchall()
            return ([(kind, name, db.execute(f'PRAGMA table_info("{name}")').fetchall()) for kind, name in objects],
                    db.execute("SELECT * FROM alembic_version").fetchall(),
                    db.execute("SELECT name, artifact_location, lifecycle_stage FROM experiments "
                               "WHERE experiment_id = 0").fetchall())

    assert described(tmp_path / "second" / "mlflow.db") == described(tmp_path / "own.db")
    tracking.seed_store(tmp_path / "second" / "mlflow.db")   # an existing store is never replaced
    assert MlflowClient(f"sqlite:///{tmp_path / 'second' / 'mlflow.db'}").get_experiment_by_name("mlgate")


def test_exit_now_exits_as_sys_exit_does(tmp_path) -> None:
    """`mlgate run` ends without tearing every module down, but after what a normal exit does first: a thread
    pool left open is shut down (its idle workers would wait forever if only joined), non-daemon threads finish,
    atexit handlers run, buffered output is written."""
    code = f"""
import atexit, concurrent.futures, sys, threading, time
from pathlib import Path
from triggers.cli import exit_now
pool = concurrent.futures.ThreadPoolExecutor(2)
pool.submit(time.sleep, 0.1)
threading.Thread(target=lambda: (time.sleep(0.3), Path({str(tmp_path)!r}, "thread").write_text("done"))).start()
atexit.register(lambda: Path({str(tmp_path)!r}, "atexit").write_text("ran"))
sys.stdout.write("buffered, no newline")
exit_now(3)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered, no newline"
    assert (tmp_path / "thread").read_text() == "done" and (tmp_path / "atexit").read_text() == "ran"
