"""A contract change is a first-class event: whole jobs where production takes another input than the candidate,
or cannot be loaded at all, and the way out (`mlgate retire`). Real training on digits, real MLflow on SQLite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from automation.config import load_config
from tests.conftest import fast_config, last_json, run_cli, write_config

MODEL = "digits_mlp"
RELATIVE = ("accuracy vs production", "latency vs production")

# the same digits, flattened: a model file whose loader hands over 64 features instead of 1×8×8 images
FLAT_MODULE = '''
from torch import nn

from models.datasets import split_arrays


def load_data(seed: int = 0):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype("float32") / 16.0).reshape(len(bunch.images), 64)
    return split_arrays(x, bunch.target.astype("int64"), classes=tuple(str(c) for c in range(10)), seed=seed,
                        val_fraction=0.15, test_fraction=0.2)


def build(hidden: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
'''


def _config(directory: Path, module: str, contract_change: str = "allow") -> Path:
    """Write `directory`/mlgate.yaml with `module` behind the one model: each call replaces the last."""
    config = fast_config(lean=True)
    config["models"] = {MODEL: {"module": module, "params": {"hidden": 64}}}
    config["defaults"]["gates"]["contract_change"] = contract_change
    return write_config(directory, config)


def _run(capsys: pytest.CaptureFixture[str], path: Path, sha: str) -> tuple[int, dict[str, Any]]:
    code, out, err = run_cli(capsys, "run", "--config", str(path), "--model", MODEL, "--trigger", "push",
                             "--sha", sha, "--json")
    assert code in (0, 3), err   # the job completes: it never fails because production differs or is broken
    return code, last_json(out)


def _checks(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in summary["gate"]["checks"]}


def _delete_artifacts(path: Path, version: str) -> None:
    """What a lost or corrupted artifact store leaves: the version registered, its files gone."""
    from mlflow import MlflowClient

    from automation import tracking

    config = load_config(path)
    client, _ = tracking.connect(config.workdir, config.experiment)
    assert isinstance(client, MlflowClient)
    location = client.get_model_version_download_uri(MODEL, version)
    local = Path(location.removeprefix("file://"))
    assert local.is_dir() and (local / "MLmodel").is_file(), location
    shutil.rmtree(local)


def test_contract_change_broken_production_and_retire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "flat_digits_contract.py").write_text(FLAT_MODULE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    images = _config(tmp_path, "models.digits_mlp")

    code, first = _run(capsys, images, "1111111")
    assert code == 0 and first["promoted"] and first["version"] == "1"

    # (a) the model now takes 64 features: production (1×8×8 images) is not benchmarked on them
    flat = _config(tmp_path, "flat_digits_contract")
    code, second = _run(capsys, flat, "2222222")
    checks = _checks(second)
    for name in RELATIVE:
        assert checks[name]["status"] == "skipped"
        assert checks[name]["reason"].startswith("not comparable: the input contract changed (production takes "
                                                 "float32 [1, 8, 8], the candidate takes float32 [64]")
    assert code == 0 and second["promoted"] and second["version"] == "2"   # on the absolute gates
    assert second["production"] is None and second["production_before"] == "1"
    line = second["contract_change"]["line"]
    assert line.startswith("Input contract changed: production ") and "[1, 8, 8]" in line and "[64]" in line
    assert line in Path(second["reports"]["md"]).read_text(encoding="utf-8")

    # (b) with `contract_change: approve` a changed contract waits for a maintainer
    code, third = _run(capsys, _config(tmp_path, "models.digits_mlp", "approve"), "3333333")
    assert code == 3 and not third["promoted"]
    check = _checks(third)["contract change"]
    assert check["status"] == "failed" and "needs a maintainer's approval" in check["reason"]
    assert "mlgate promote MODEL VERSION --reason" in check["reason"]

    # (c) production's files are gone: the next job still completes, judged on the absolute gates
    _delete_artifacts(flat, "2")
    flat = _config(tmp_path, "flat_digits_contract")   # one mlgate.yaml (its workdir beside it), rewritten per run
    code, fourth = _run(capsys, flat, "4444444")
    for name in RELATIVE:
        assert _checks(fourth)[name]["reason"].startswith("not comparable: production could not be loaded (")
    assert code == 0 and fourth["promoted"] and fourth["version"] == "4"

    # (d) `versions` lists each version's contract; `retire` takes production away, audited
    code, out, _ = run_cli(capsys, "versions", MODEL, "--config", str(flat), "--json")
    rows = {r["version"]: r for r in map(json.loads, out.strip().splitlines())}
    assert code == 0 and set(rows) == {"1", "2", "3", "4"}
    assert rows["1"]["contract"]["input_shape"] == [1, 8, 8] and rows["4"]["contract"]["input_shape"] == [64]
    assert rows["4"]["alias"] == "production" and rows["2"]["signature"].startswith("unreadable (")
    assert rows["3"]["gate"] == "failed" and rows["1"]["gate"] == "passed"

    code, out, _ = run_cli(capsys, "retire", MODEL, "--config", str(flat), "--reason", "wrong input layout")
    assert code == 0 and "version 4 retired" in out
    code, out, _ = run_cli(capsys, "history", MODEL, "--config", str(flat))
    retired = json.loads(out.strip().splitlines()[-1])
    assert retired["action"] == "retire" and retired["replaced_version"] == "4"
    assert retired["reason"] == "wrong input layout"
    code, out, _ = run_cli(capsys, "versions", MODEL, "--config", str(flat))
    assert "@production" not in out and "v4 @previous" in out

    code, fifth = _run(capsys, flat, "5555555")
    assert fifth["production_before"] is None and fifth["not_comparable"] is None
    assert code == 0 and fifth["promoted"] and fifth["version"] == "5"
    assert all(_checks(fifth)[name]["reason"] == "nothing in production yet" for name in RELATIVE)


def test_retire_refuses_a_missing_reason_an_unknown_model_and_no_production(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, fast_config(lean=True))
    with pytest.raises(SystemExit) as exited:   # argparse: --reason is required
        run_cli(capsys, "retire", MODEL, "--config", str(path))
    assert exited.value.code == 2 and "--reason" in capsys.readouterr().err
    code, _, err = run_cli(capsys, "retire", "no_such_model", "--config", str(path), "--reason", "x")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unknown model 'no_such_model'" in err
    code, _, err = run_cli(capsys, "retire", MODEL, "--config", str(path), "--reason", "x")
    assert code == 2 and "nothing is in production" in err
    code, out, _ = run_cli(capsys, "versions", MODEL, "--config", str(path))
    assert code == 0 and out.strip() == f"{MODEL}: no version registered yet"
