"""The served-artifact check after export (automation/serving_check.py, job.served_stage): the new version,
loaded from the registry as `serve-model` loads it, must answer the validate stage's decoded requests as the
job's model did, or nothing is promoted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from automation import predictors
from tests.conftest import fast_config, last_json, run_cli, write_config


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    config = fast_config(epochs=3, lean=True)
    config["defaults"]["gates"] = {"absolute": {"min_accuracy": 0.5}}
    code, out, err = run_cli(capsys, "run", "--config", str(write_config(tmp_path, config)), "--model",
                             "digits_mlp", "--json")
    return code, last_json(out)


def test_a_registered_version_that_answers_differently_is_not_promoted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    loaded = predictors.load_registered

    def drifted(*args: Any, **kwargs: Any) -> Any:   # what a broken export or a lost pre-processing step does
        model = loaded(*args, **kwargs)
        inner = model.predictor

        class Off:
            device, memory_kind = inner.device, inner.memory_kind
            prepare = staticmethod(inner.prepare)
            run = staticmethod(inner.run)

            @staticmethod
            def to_numpy(output: Any) -> np.ndarray:
                logits = inner.to_numpy(output)
                return logits[:, ::-1].copy()   # classes in the wrong order

        model.predictor = Off()
        return model

    monkeypatch.setattr(predictors, "load_registered", drifted)
    code, summary = _run(tmp_path, capsys)
    check = next(c for c in summary["gate"]["checks"] if c["name"] == "served artifact")
    assert code == 3 and not summary.get("promoted")
    assert check["status"] == "failed" and "answers a JSON /predict request differently" in check["reason"]


def test_a_registered_version_that_cannot_load_is_a_failed_check_not_a_crash(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    def unloadable(*args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError("the version has no model.onnx")

    monkeypatch.setattr(predictors, "load_registered", unloadable)
    code, summary = _run(tmp_path, capsys)
    check = next(c for c in summary["gate"]["checks"] if c["name"] == "served artifact")
    assert code == 3 and not summary.get("promoted")
    assert check["reason"] == ("loading the registered version failed: FileNotFoundError: the version has no "
                               "model.onnx")


def test_the_same_artifact_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, summary = _run(tmp_path, capsys)
    check = next(c for c in summary["gate"]["checks"] if c["name"] == "served artifact")
    assert code == 0 and summary["promoted"] and check["status"] == "passed" and check["observed"] == 0.0
