"""A judge the candidate cannot steer: control flow is refused unless the base branch allows it, and every call on
the candidate has a time-out that the base branch sets (finding 9 of issue 29)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from automation.candidate import BadCandidate, read_candidate
from tests.conftest import error_lines, fast_config, run_cli, seed_mlflow_store, write_config

DIGITS = ((1, 8, 8), "float32", tuple(str(i) for i in range(10)))


def looping_candidate(folder: Path, trips: int = 10 ** 15) -> Path:
    """Digits logits from one MatMul, then a Loop adding zero `trips` times: a candidate that spins."""
    import onnx
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "zero"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["n", 10])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["n", 10])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["raw"]),
         helper.make_node("Loop", ["trips", "go", "raw"], ["logits"], body=body)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        [helper.make_tensor("w", TensorProto.FLOAT, [64, 10], rng.normal(size=640).astype(np.float32).tolist()),
         helper.make_tensor("trips", TensorProto.INT64, [], [trips]),
         helper.make_tensor("go", TensorProto.BOOL, [], [True])])
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    (folder / "candidate.json").write_text(json.dumps({"input_shape": [1, 8, 8], "dtype": "float32",
                                                       "classes": list(DIGITS[2])}))
    return folder


def test_control_flow_is_refused_unless_the_base_branch_allows_it(tmp_path: Path) -> None:
    folder = looping_candidate(tmp_path / "candidate")
    with pytest.raises(BadCandidate) as refused:
        read_candidate(folder, *DIGITS, text=False)
    assert "Loop" in str(refused.value) and "judge.allow_control_flow" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert read_candidate(folder, *DIGITS, text=False, allow_control_flow=True).onnx.name == "model.onnx"


def test_a_call_past_its_time_out_is_stopped_in_one_line(tmp_path: Path) -> None:
    from automation.predictors import CallTimedOut, OnnxPredictor

    spinning = OnnxPredictor(looping_candidate(tmp_path / "spins") / "model.onnx", call_timeout=0.5)
    with pytest.raises(CallTimedOut, match=r"ran past its 0.5 s \(judge.call_timeout_seconds\)"):
        spinning.run(spinning.prepare(np.zeros((2, 1, 8, 8), np.float32)))
    # the same graph with a short loop answers, and the watchdog stays out of the way call after call
    quick = OnnxPredictor(looping_candidate(tmp_path / "quick", trips=3) / "model.onnx", call_timeout=0.5)
    for _ in range(20):
        assert quick.to_numpy(quick.run(quick.prepare(np.zeros((2, 1, 8, 8), np.float32)))).shape == (2, 10)


def test_the_judge_ends_a_looping_candidate_with_one_line(tmp_path: Path, mlflow_template: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Through `mlgate run --judge`: with control flow allowed, the loop is stopped by the time-out and the job
    ends in one line, instead of spinning until the job's time-out (240 min by default)."""
    config = fast_config(epochs=1)
    config["models"] = {"digits_mlp": config["models"]["digits_mlp"] | {
        "judge": {"allow_control_flow": True, "call_timeout_seconds": 1}}}
    config["workdir"] = str(tmp_path / "work")
    seed_mlflow_store(tmp_path / "work", mlflow_template)
    path = write_config(tmp_path, config)
    folder = looping_candidate(tmp_path / "candidate")
    code, _, err = run_cli(capsys, "run", "--config", str(path), "--model", "digits_mlp", "--trigger", "pr",
                           "--pr", "7", "--judge", str(folder), "--json")
    lines = [line for line in error_lines(err) if not line.startswith("Hint:")]
    assert code != 0 and len(lines) == 1 and "judge.call_timeout_seconds" in lines[0], err[-2000:]
    assert "Traceback" not in err


def test_a_stopped_call_says_so_in_one_line_and_onnx_runtime_adds_nothing(tmp_path: Path,
                                                                         capfd: pytest.CaptureFixture[str]) -> None:
    """ONNX Runtime logged its own error for the stopped call (a red, multi-part line on the process's stderr)
    beside ours: the judge's reason is the one line a reader gets."""
    from automation.predictors import CallTimedOut, OnnxPredictor

    spinning = OnnxPredictor(looping_candidate(tmp_path / "spins") / "model.onnx", call_timeout=0.3)
    for _ in range(2):   # and the watchdog re-arms for the next call
        with pytest.raises(CallTimedOut):
            spinning.run(spinning.prepare(np.zeros((1, 1, 8, 8), np.float32)))
    captured = capfd.readouterr()
    assert "onnxruntime" not in captured.err and "terminate flag" not in captured.err, captured.err


@pytest.mark.parametrize("declared", [16_384, 8, "garbage"])
def test_a_candidate_tokenizer_cannot_set_the_judges_sequence_length(tmp_path: Path, declared: object) -> None:
    """Finding 6: the judge encoded the test texts to whatever length the candidate's tokenizer.json said (its
    peak memory grew with it). The length is the base branch's; a tokenizer that says otherwise is refused."""
    from automation.job import _candidate_tokenizer
    from automation.preprocess import Tokenize

    texts = [f"article {i} about markets sport and politics, words {i % 7}" for i in range(200)]
    path = Tokenize(vocab_size=100, max_length=16).fit(texts).save(tmp_path)
    assert _candidate_tokenizer(path, (16,)).encode(["a short text"]).shape == (1, 16)
    state = json.loads(path.read_text())
    if declared == "garbage":
        path.write_text("{not json")
    else:
        state["mlgate"]["max_length"] = declared
        path.write_text(json.dumps(state))
    with pytest.raises(BadCandidate) as refused:
        _candidate_tokenizer(path, (16,))
    assert "\n" not in str(refused.value)
    assert (f"makes {declared:,} tokens" if declared != "garbage" else "not a tokenizer") in str(refused.value)
