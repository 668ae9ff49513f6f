from __future__ import annotations

import copy
from pathlib import Path

import pytest

from automation.config import load_config
from tests.conftest import FAST_CONFIG, error_lines, run_cli, write_config


def _assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = error_lines(stderr)
    assert len(lines) in (1, 2), lines             # "Error: …" and at most a "Hint: …"
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_defaults_are_merged_under_each_model(config_path: Path) -> None:
    config = load_config(config_path)
    mlp = config.model("digits_mlp")
    assert mlp.train.epochs == 15 and mlp.params == {"hidden": 64}
    assert mlp.gates.absolute.min_accuracy == 0.85
    assert mlp.gates.relative.max_accuracy_drop == 0.01            # schema default survives the merge
    assert config.workdir == (config_path.parent / "state").resolve()


def test_embedded_defaults_load_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config()
    assert set(config.models) == {"digits_mlp", "digits_cnn"}


@pytest.mark.parametrize("mutate, fragments", [
    (lambda c: c["models"]["digits_mlp"].update(trian={"epochs": 3}), ["models.digits_mlp.trian", "Extra inputs"]),
    (lambda c: c["defaults"]["gates"]["absolute"].update(min_accuracy="high"),
     ["defaults.gates.absolute.min_accuracy", "valid number"]),
    (lambda c: c["models"]["digits_cnn"].update(train={"epochs": -1}), ["models.digits_cnn.train.epochs"]),
    (lambda c: c.update(models={}), ["at least one model"]),
    (lambda c: c["models"]["digits_mlp"].update(optimize={"variants": ["tflite"]}),
     ["models.digits_mlp.optimize.variants.0"]),
])
def test_bad_config_exits_2_with_key_path(tmp_path: Path, capsys: pytest.CaptureFixture[str], mutate, fragments) -> None:
    config = copy.deepcopy(FAST_CONFIG)
    mutate(config)
    path = write_config(tmp_path, config)
    code, _, err = run_cli(capsys, "run", "--config", str(path))
    assert code == 2
    _assert_one_line_error(err, str(path), *fragments)
    assert not (tmp_path / "state").exists()                          # nothing was started


def test_invalid_yaml_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mlgate.yaml"
    path.write_text("models:\n  a: [unclosed\n")
    code, _, err = run_cli(capsys, "run", "--config", str(path))
    assert code == 2
    _assert_one_line_error(err, "not valid YAML")


def test_unknown_model_exits_2(config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "run", "--config", str(config_path), "--model", "resnet")
    assert code == 2
    _assert_one_line_error(err, "unknown model 'resnet'", "digits_cnn, digits_mlp")


def test_missing_model_module_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = copy.deepcopy(FAST_CONFIG)
    config["models"]["digits_mlp"]["module"] = "models.does_not_exist"
    code, _, err = run_cli(capsys, "run", "--config", str(write_config(tmp_path, config)), "--model", "digits_mlp")
    assert code == 2
    _assert_one_line_error(err, "models.digits_mlp.module", "models.does_not_exist")


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "run", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2
    _assert_one_line_error(err, "cannot read config")


def test_pr_trigger_needs_pr_number(config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "run", "--config", str(config_path), "--trigger", "pr")
    assert code == 2
    _assert_one_line_error(err, "--pr N")


def test_on_cpu_merges_over_the_model_block_and_is_checked_when_read(tmp_path: Path) -> None:
    from automation.config import parse_config
    from automation.errors import UsageError

    text = """
models:
  m:
    module: models.digits_mlp
    params: {hidden: 64}
    train: {epochs: 30, lr: 0.01}
    on_cpu: {params: {hidden: 16}, train: {epochs: 2}}
"""
    spec = parse_config(text, "x.yaml", tmp_path).model("m")
    short = spec.for_cpu()
    assert (short.params, short.train.epochs, short.train.lr) == ({"hidden": 16}, 2, 0.01)   # merged, not replaced
    assert spec.train.epochs == 30 and not short.on_cpu
    with pytest.raises(UsageError, match=r"x.yaml: models.m.on_cpu.train.epoch: Extra inputs are not permitted"):
        parse_config(text.replace("epochs: 2", "epoch: 2"), "x.yaml", tmp_path)
