"""Whole jobs through the CLI: real training, real ONNX Runtime, real MLflow on SQLite in a temp dir."""

from __future__ import annotations

import contextlib
import copy
import io
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from automation import promote, store, tracking
from automation.config import load_config
from tests.conftest import FAST_CONFIG, error_lines, last_json, run_cli, write_config
from triggers.cli import main


def _state(config_path: Path) -> tuple[MlflowClient, object]:
    config = load_config(config_path)
    client, _ = tracking.connect(config.workdir, config.experiment)
    return client, store.open_store(store.database_url(config.workdir))


@pytest.fixture(scope="module")
def first_two_runs(tmp_path_factory: pytest.TempPathFactory):
    """Run 1 promotes the first model; run 2 is compared with it. Shared by the tests below."""
    directory = tmp_path_factory.mktemp("pipeline")
    path = write_config(directory)
    outputs = []
    for sha in ("1111111", "2222222"):
        out = io.StringIO()   # capsys is function-scoped; capture stdout by hand
        with contextlib.redirect_stdout(out):
            code = main(["run", "--config", str(path), "--model", "digits_mlp", "--trigger", "push",
                         "--sha", sha, "--json"], standalone=False)
        outputs.append((code, out.getvalue()))
    return path, outputs


def test_first_run_promotes(first_two_runs) -> None:
    path, outputs = first_two_runs
    code, out = outputs[0]
    summary = last_json(out)
    assert code == 0
    assert summary["promoted"] is True and summary["version"] == "1"
    assert summary["gate"]["passed"] and summary["production_before"] is None
    relative = [c for c in summary["gate"]["checks"] if "production" in c["name"]]
    assert relative and all(c["status"] == "skipped" for c in relative)
    assert summary["chosen_variant"] in {"torch_eager", "onnx_fp32", "onnx_int8"}
    assert summary["metrics"]["accuracy"] > 0.85
    assert {"train", "optimize", "benchmark", "gate", "promote", "report"} <= set(summary["timings"])
    for kind in ("md", "html", "json"):
        assert Path(summary["reports"][kind]).is_file()


def test_run_is_logged_to_mlflow(first_two_runs) -> None:
    path, outputs = first_two_runs
    summary = last_json(outputs[0][1])
    client, _ = _state(path)
    run = client.get_run(summary["run_id"])
    assert run.data.tags["mlflow.source.git.commit"] == "1111111"
    assert run.data.tags["mlgate.data_fingerprint"] == summary["data_fingerprint"]
    assert run.data.tags["env.torch"].startswith("2.")
    assert run.data.params["model.hidden"] == "64"
    history = client.get_metric_history(summary["run_id"], "val_accuracy")
    assert [m.step for m in history] == list(range(1, len(summary["training"]["history"]) + 1))
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"], "report")}
    assert {"report/report.md", "report/report.html", "report/report.json"} <= artifacts
    names = {m.name for m in client.search_logged_models(experiment_ids=[run.info.experiment_id])}
    assert {"torch", "onnx"} <= names
    version = client.get_model_version("digits_mlp", "1")
    assert version.tags[promote.GATE_TAG] == "passed"
    assert "1111111" in version.tags["mlgate.evidence"]


def test_second_run_compares_with_production(first_two_runs) -> None:
    path, outputs = first_two_runs
    code, out = outputs[1]
    summary = last_json(out)
    assert code == 0 and summary["production_before"] == "1" and summary["version"] == "2"
    checks = {c["name"]: c for c in summary["gate"]["checks"]}
    assert checks["accuracy vs production"]["status"] == "passed"
    assert "CI" in checks["accuracy vs production"]["reason"]
    assert checks["latency vs production"]["status"] == "passed"
    assert summary["production"]["version"] == "1"
    client, engine = _state(path)
    assert promote.alias_state(client, "digits_mlp") == promote.AliasState(production="2", previous="1")
    trail = promote.audit_trail(engine, "digits_mlp")
    assert [(r.version, r.replaced_version) for r in trail] == [("1", None), ("2", "1")]
    markdown = Path(summary["reports"]["md"]).read_text()
    assert "| accuracy |" in markdown and "production" in markdown


def test_impossible_threshold_exits_3_and_production_is_unchanged(first_two_runs, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = first_two_runs
    config = copy.deepcopy(FAST_CONFIG)
    config["workdir"] = str(load_config(path).workdir)
    config["models"]["digits_mlp"]["gates"] = {"absolute": {"min_accuracy": 0.9999}}
    strict = write_config(tmp_path, config)
    code, out, err = run_cli(capsys, "run", "--config", str(strict), "--model", "digits_mlp", "--json")
    assert code == 3
    summary = last_json(out)
    assert summary["promoted"] is False and summary["gate"]["passed"] is False
    assert error_lines(err)[0].startswith("Error: gate failed for digits_mlp (min accuracy)")
    client, engine = _state(path)
    assert promote.alias_state(client, "digits_mlp").production == "2"
    assert client.get_model_version("digits_mlp", summary["version"]).tags[promote.GATE_TAG] == "failed"
    assert "❌ min accuracy" in Path(summary["reports"]["md"]).read_text()
    # the failed version cannot sneak in through the automatic path either
    with pytest.raises(Exception, match="did not pass its gate"):
        promote.promote(client, engine, "digits_mlp", summary["version"], reason="test")


def test_pr_job_evaluates_but_never_registers_or_promotes(first_two_runs, capsys) -> None:
    path, _ = first_two_runs
    client, _ = _state(path)
    before = len(client.search_model_versions("name='digits_mlp'"))
    code, out, _ = run_cli(capsys, "run", "--config", str(path), "--model", "digits_mlp", "--trigger", "pr",
                           "--pr", "7", "--sha", "abcdef0", "--json")
    summary = last_json(out)
    assert code == 0 and summary["promoted"] is False and summary["version"] is None
    assert summary["production"]["version"] == "2"
    assert len(client.search_model_versions("name='digits_mlp'")) == before
    assert "evaluation only" in Path(summary["reports"]["md"]).read_text()


def test_rollback_and_manual_promote_are_audited(first_two_runs, capsys) -> None:
    path, _ = first_two_runs
    client, engine = _state(path)
    code, out, _ = run_cli(capsys, "rollback", "digits_mlp", "--reason", "bad canary", "--config", str(path))
    assert code == 0 and "version 1 is now production" in out
    assert promote.alias_state(client, "digits_mlp") == promote.AliasState(production="1", previous=None)
    code, _, err = run_cli(capsys, "rollback", "digits_mlp", "--reason", "again", "--config", str(path))
    assert code == 2 and "no '@previous'" in err
    code, out, _ = run_cli(capsys, "promote", "digits_mlp", "2", "--reason", "canary fixed", "--config", str(path))
    assert code == 0
    assert promote.alias_state(client, "digits_mlp") == promote.AliasState(production="2", previous="1")
    trail = promote.audit_trail(engine, "digits_mlp")
    assert [(r.action, r.version, r.reason) for r in trail[-2:]] == [
        ("rollback", "1", "bad canary"), ("manual_promote", "2", "canary fixed")]


def test_cnn_job_with_every_variant_survives_a_failing_one(tmp_path: Path, capsys, monkeypatch) -> None:
    from automation import optimize

    def broken_quantizer(*_args, **_kwargs):
        raise RuntimeError("[ShapeInferenceError] Inferred shape and existing shape differ in dimension 0: (64) vs (10)")

    monkeypatch.setattr(optimize, "quantize_int8", broken_quantizer)
    config = copy.deepcopy(FAST_CONFIG)
    # every variant, compiled ones included, each timed at every batch size
    config["defaults"]["optimize"] = {"skip_compile_when_onnx_speedup": None, "probe_margin": None}
    path = write_config(tmp_path, config)
    code, out, err = run_cli(capsys, "run", "--config", str(path), "--model", "digits_cnn", "--json")
    summary = last_json(out)
    assert code == 0 and summary["model"] == "digits_cnn"
    variants = {v["name"]: v for v in summary["variants"]}
    assert variants["onnx_int8"]["skipped"].startswith("onnx_int8 build failed: RuntimeError: [ShapeInferenceError]")
    for name in ("torch_eager", "torch_half", "torch_compile", "torch_aoti", "onnx_fp32"):
        assert variants[name]["skipped"] is None and variants[name]["accuracy"] > 0.85, variants[name]
        assert set(variants[name]["latency"]) == {"1", "16"} and variants[name]["build_seconds"] >= 0
    assert summary["chosen_variant"] in {n for n, v in variants.items() if v["skipped"] is None}
    assert summary["environment"]["device"] == summary["training"]["device"]
    assert summary["environment"]["fp32_precision"] == "fp32" and summary["environment"]["matmul_precision"] == "highest"
    assert "AUTOTUNE" not in err and not [line for line in error_lines(err) if "warn" in line.lower()]
    markdown = Path(summary["reports"]["md"]).read_text()
    assert markdown.startswith("<!-- mlgate-report model=digits_cnn -->")
    assert len(markdown) < 65_536
    blocks = re.findall(r"```mermaid\n(.*?)```", markdown, flags=re.S)
    assert len(blocks) == 3
    for block in blocks:
        lines = block.strip().splitlines()
        assert lines[0] == "xychart-beta" and lines[1].strip().startswith("title ")
        assert any(l.strip().startswith(("line [", "bar [")) for l in lines)
        assert re.search(r'y-axis "[^"]+" -?[\d.e+-]+ --> [\d.e+-]+', block)
    for name, variant in variants.items():
        assert f"`{name}`" in markdown
        if variant["skipped"]:
            assert variant["skipped"] in markdown
    html = Path(summary["reports"]["html"]).read_text()
    assert html.count("data:image/png;base64,") >= 2 and "<table>" in html


def test_unreachable_tracking_server_exits_1_with_one_line(config_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:s3cret@127.0.0.1:9/")
    code, _, err = run_cli(capsys, "run", "--config", str(config_path), "--model", "digits_mlp")
    assert code == 1
    lines = error_lines(err)
    assert lines[0].startswith("Error: MLflow tracking store at http://") and "unreachable" in lines[0]
    assert "s3cret" not in err and "Traceback" not in err


def test_a_device_specific_artifact_is_served_by_its_portable_form_elsewhere(tmp_path: Path, capsys,
                                                                            monkeypatch) -> None:
    """An AOTInductor package only runs on the device it was compiled for. A version whose package was
    built on a GPU runner still loads on a CPU machine: through the torch model logged beside it."""
    import numpy as np

    from automation import optimize
    from automation.device import CPU
    from automation.predictors import AotiPredictor, load_registered, predict
    from models.datasets import digits
    from tests.conftest import fast_config

    real_choose = optimize.choose_variant

    def choose_aoti(variants, tolerance, batch_size):   # the registry path is the subject, not the choice
        real_choose(variants, tolerance, batch_size)
        return next(v for v in variants if v.name == "torch_aoti"), "forced by the test"

    monkeypatch.setattr(optimize, "choose_variant", choose_aoti)
    config = fast_config(epochs=6)
    config["defaults"]["optimize"]["variants"] = ["torch_eager", "torch_aoti"]
    config["defaults"]["optimize"]["probe_margin"] = None   # aoti measured whatever eager's speed
    path = write_config(tmp_path, config)
    code, out, _ = run_cli(capsys, "run", "--config", str(path), "--model", "digits_mlp", "--json")
    assert code == 0 and last_json(out)["chosen_variant"] == "torch_aoti"
    client, _ = _state(path)
    native = load_registered(client, "digits_mlp", "1", tmp_path / "native", CPU)
    assert native.served_as == "torch_aoti" and isinstance(native.predictor, AotiPredictor)
    assert native.fallback_reason is None
    client.set_model_version_tag("digits_mlp", "1", "mlgate.device", "cuda:0")   # as a GPU runner tags it
    elsewhere = load_registered(client, "digits_mlp", "1", tmp_path / "elsewhere", CPU)
    assert elsewhere.served_as == "torch_eager" and "compiled for cuda:0" in elsewhere.fallback_reason
    x = digits(seed=0).x_test
    assert np.abs(predict(native.predictor, x) - predict(elsewhere.predictor, x)).max() < 1e-3
