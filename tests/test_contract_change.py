"""A contract change is a first-class event: whole jobs where production takes another input than the candidate,
or cannot be loaded at all, and the way out (`mlgate retire`). Real training on digits, real MLflow on SQLite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from automation.config import load_config
from tests.conftest import error_lines, fast_config, last_json, run_cli, write_config

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
    return split_arrays(x, bunch.target.astype("int64"), classes=tuple(f"{PREFIX}{c}" for c in range(10)), seed=seed,
                        val_fraction=0.15, test_fraction=0.2)


def build(hidden: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
'''


def _write_modules(directory: Path) -> None:
    """flat_digits_contract: 64 features, classes "0".."9"; flat_digits_renamed: the same input, classes "d0".."d9"."""
    for name, prefix in (("flat_digits_contract", ""), ("flat_digits_renamed", "d")):
        (directory / f"{name}.py").write_text(f"PREFIX = {prefix!r}\n" + FLAT_MODULE, encoding="utf-8")


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


def test_no_sequence_of_jobs_leaves_production_unpassable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Production that takes another input, names other classes, has lost its files, was rolled back to such a
    version, or was retired: each next job completes with a verdict and promotes on the absolute gates."""
    _write_modules(tmp_path)
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
    assert line.startswith("Input contract changed: production tensor float32 [1, 8, 8]; 10 classes: 0, 1,")
    assert "→ candidate tensor float32 [64]; 10 classes: 0, 1," in line
    assert line in Path(second["reports"]["md"]).read_text(encoding="utf-8")
    html = Path(second["reports"]["html"]).read_text(encoding="utf-8")
    assert "Input contract changed: production tensor float32 [1, 8, 8]" in html and "candidate tensor float32 [64]" in html

    # (b) the same input, other class names: "the classes changed", both lists in the report
    code, third = _run(capsys, _config(tmp_path, "flat_digits_renamed"), "3333333")
    for name in RELATIVE:
        assert _checks(third)[name]["reason"].startswith(
            "not comparable: the classes changed (production: 0, 1, 2, 3, 4, 5, 6, 7, … (10 in all); "
            "the candidate: d0, d1,")
    assert third["contract_change"]["line"].startswith("Classes changed: production tensor float32 [64]")
    assert third["contract_change"]["line"] in Path(third["reports"]["md"]).read_text(encoding="utf-8")
    assert code == 0 and third["promoted"] and third["version"] == "3"

    # (c) with `contract_change: approve` a changed contract waits for a maintainer
    code, fourth = _run(capsys, _config(tmp_path, "models.digits_mlp", "approve"), "4444444")
    assert code == 3 and not fourth["promoted"]
    check = _checks(fourth)["contract change"]
    assert check["status"] == "failed" and "needs a maintainer's approval" in check["reason"]
    assert "mlgate promote MODEL VERSION --reason" in check["reason"]
    code, out, _ = run_cli(capsys, "promote", MODEL, "4", "--config", str(flat), "--reason", "approved: images again")
    assert code == 0 and "version 4 is now production (was 3)" in out   # the maintainer's approval, audited

    # (d) production's files are gone: the next job still completes, judged on the absolute gates
    _delete_artifacts(flat, "4")
    flat = _config(tmp_path, "flat_digits_contract")   # one mlgate.yaml (its workdir beside it), rewritten per run
    code, fifth = _run(capsys, flat, "5555555")
    for name in RELATIVE:
        assert _checks(fifth)[name]["reason"].startswith("not comparable: production could not be loaded (")
    assert code == 0 and fifth["promoted"] and fifth["version"] == "5"

    # (e) a person rolls back onto the broken version: still a way forward
    code, out, _ = run_cli(capsys, "rollback", MODEL, "--config", str(flat), "--reason", "v5 misbehaves")
    assert code == 0 and "version 4 is now production (was 5)" in out
    code, sixth = _run(capsys, flat, "6666666")
    assert sixth["production_before"] == "4" and sixth["not_comparable"].startswith("not comparable: production")
    assert code == 0 and sixth["promoted"] and sixth["version"] == "6"

    # (f) `versions` lists each version's contract, gate, accuracy and alias, a version whose files are gone too
    code, out, _ = run_cli(capsys, "versions", MODEL, "--config", str(flat), "--json")
    rows = {r["version"]: r for r in map(json.loads, out.strip().splitlines())}
    assert code == 0 and set(rows) == {"1", "2", "3", "4", "5", "6"}
    assert rows["1"]["contract"]["input_shape"] == [1, 8, 8] and rows["6"]["contract"]["input_shape"] == [64]
    assert rows["3"]["contract"]["classes"][:2] == ["d0", "d1"]
    assert rows["4"]["alias"] == "previous" and rows["4"]["signature"].startswith("unreadable (")
    assert rows["4"]["gate"] == "failed" and rows["6"]["alias"] == "production"
    assert rows["6"]["gate"] == "passed" and rows["6"]["accuracy"] == pytest.approx(sixth["metrics"]["accuracy"])
    assert rows["6"]["signature"].startswith("tensor float32 [64]; 10 classes: 0, 1, 2")
    code, out, _ = run_cli(capsys, "versions", MODEL, "--config", str(flat))
    assert f"{MODEL} v6 @production: gate passed; accuracy " in out and "; tensor float32 [64]; 10 classes" in out
    assert f"{MODEL} v1: gate passed; accuracy " in out and "; tensor float32 [1, 8, 8]" in out

    # (g) `retire` takes production away, audited; serving then says there is no production version
    code, out, _ = run_cli(capsys, "retire", MODEL, "--config", str(flat), "--reason", "wrong input layout")
    assert code == 0 and "version 6 retired" in out
    code, out, _ = run_cli(capsys, "history", MODEL, "--config", str(flat))
    retired = json.loads(out.strip().splitlines()[-1])
    assert (retired["action"], retired["version"], retired["replaced_version"]) == ("retire", "", "6")
    assert retired["reason"] == "wrong input layout"
    code, out, _ = run_cli(capsys, "versions", MODEL, "--config", str(flat))
    assert "@production" not in out and f"{MODEL} v6 @previous" in out
    _assert_serving_says_no_production(flat)

    # (h) the next job runs as the first did, with nothing in production, and promotes
    code, seventh = _run(capsys, flat, "7777777")
    assert seventh["production_before"] is None and seventh["not_comparable"] is None
    assert code == 0 and seventh["promoted"] and seventh["version"] == "7"
    assert all(_checks(seventh)[name]["reason"] == "nothing in production yet" for name in RELATIVE)




def _assert_serving_says_no_production(path: Path) -> None:
    from fastapi.testclient import TestClient

    from triggers.serving.server import ModelServer, create_serving_app

    server = ModelServer(load_config(path), MODEL)
    assert server.sync() is False and server.production is None
    answer = TestClient(create_serving_app(server)).post("/predict", json={"inputs": [[0.0] * 64]})
    assert answer.status_code == 503 and f"no production version of {MODEL}" in answer.text


def test_moves_without_a_reason_or_of_an_unknown_model_are_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, fast_config(lean=True))
    for argv in (("retire", MODEL), ("retire", MODEL, "--reason", "  "), ("rollback", MODEL),
                 ("promote", MODEL, "1")):
        code, out, err = run_cli(capsys, *argv, "--config", str(path))
        assert code == 2 and out == "" and error_lines(err) == [
            f"Error: mlgate {argv[0]} needs --reason TEXT: why, recorded in the audit trail"], argv
    for argv in (("retire", "no_such_model", "--reason", "x"), ("versions", "no_such_model")):
        code, _, err = run_cli(capsys, *argv, "--config", str(path))
        assert code == 2 and len(error_lines(err)) == 1 and "unknown model 'no_such_model'" in err
    code, _, err = run_cli(capsys, "retire", MODEL, "--config", str(path), "--reason", "x")
    assert code == 2 and error_lines(err) == [f"Error: cannot retire {MODEL}: nothing is in production"]
    code, out, _ = run_cli(capsys, "versions", MODEL, "--config", str(path))
    assert code == 0 and out.strip() == f"{MODEL}: no version registered yet"
