"""A judge the candidate cannot steer (issue 29): control flow is refused unless the base branch allows it, and
every call on the candidate has a time-out that the base branch sets (finding 9); the sequence length is the base
branch's (finding 6); and the judge measures on a held-out set the build never had (finding 7)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def test_any_node_that_runs_a_subgraph_is_control_flow(tmp_path: Path) -> None:
    """com.microsoft's BeamSearch (or GreedySearch, Sampling) loops over its own subgraphs up to a length its
    attributes set: a standard domain, and not named Loop, Scan or If, but control flow all the same."""
    import onnx
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info
    folder = looping_candidate(tmp_path / "candidate", trips=1)
    model = onnx.load(str(folder / "model.onnx"))
    body = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "decoder",
                             [value("a", TensorProto.FLOAT, [1])], [value("b", TensorProto.FLOAT, [1])])
    loop = next(node for node in model.graph.node if node.op_type == "Loop")
    model.graph.node.remove(loop)   # no Loop left: only the contrib node carries a graph
    model.graph.node.append(helper.make_node("BeamSearch", ["raw"], ["logits"], domain="com.microsoft",
                                             decoder=body, max_length=10 ** 9))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(folder / "model.onnx"))
    with pytest.raises(BadCandidate, match=r"control flow \(BeamSearch\).*judge.allow_control_flow"):
        read_candidate(folder, *DIGITS, text=False)


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
    assert code != 0 and len(lines) == 1 and "(judge.call_timeout_seconds) and was stopped" in lines[0], err[-2000:]
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


def test_the_candidates_calls_together_are_stopped_past_the_total(tmp_path: Path) -> None:
    """Calls that each stay under judge.call_timeout_seconds (30 s) still held the judge for hours: evaluation
    and timing make hundreds of them. Past judge.total_seconds, the running call is stopped, and no more start."""
    from automation.predictors import CallTimedOut, OnnxPredictor

    spinning = OnnxPredictor(looping_candidate(tmp_path / "spins") / "model.onnx", call_timeout=600,
                             total_seconds=0.3)
    for _ in range(2):   # the first is stopped at the total's deadline, not its own; the next never starts
        with pytest.raises(CallTimedOut, match=r"took its 0.3 s in all \(judge.total_seconds\)"):
            spinning.run(spinning.prepare(np.zeros((1, 1, 8, 8), np.float32)))


def test_the_judge_ends_a_candidate_past_its_total_with_one_line(tmp_path: Path, mlflow_template: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = fast_config(epochs=1)
    config["models"] = {"digits_mlp": config["models"]["digits_mlp"] | {
        "judge": {"allow_control_flow": True, "call_timeout_seconds": 600, "total_seconds": 1}}}
    config["workdir"] = str(tmp_path / "work")
    seed_mlflow_store(tmp_path / "work", mlflow_template)
    path = write_config(tmp_path, config)
    code, _, err = run_cli(capsys, "run", "--config", str(path), "--model", "digits_mlp", "--trigger", "pr",
                           "--pr", "7", "--judge", str(looping_candidate(tmp_path / "candidate")), "--json")
    lines = [line for line in error_lines(err) if not line.startswith("Hint:")]
    assert code != 0 and len(lines) == 1 and "(judge.total_seconds) and were stopped" in lines[0], err[-2000:]
    assert "Traceback" not in err


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


# --- finding 7: the judge measures on examples the build never had -------------------------------------------

def lookup_table_candidate(folder: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """A candidate that is a lookup table of (x, y): an input equal to a memorized example gets its label,
    anything else all-zero logits (class 0). Squared distances to every memorized example, thresholded."""
    import onnx
    from onnx import TensorProto, helper

    flat = x.reshape(len(x), -1).astype(np.float32)
    onehot = np.eye(10, dtype=np.float32)[y]

    def const(name: str, array: np.ndarray) -> Any:
        return helper.make_tensor(name, TensorProto.FLOAT, array.shape, array.ravel().tolist())

    nodes = [helper.make_node("Flatten", ["x"], ["flat"]),
             helper.make_node("ReduceSumSquare", ["flat"], ["xx"], axes=[1], keepdims=1),
             helper.make_node("MatMul", ["flat", "memory_t"], ["dot"]),
             helper.make_node("Mul", ["dot", "two"], ["dot2"]),
             helper.make_node("Sub", ["xx", "dot2"], ["partial"]),
             helper.make_node("Add", ["partial", "memory_sq"], ["distance"]),
             helper.make_node("Less", ["distance", "threshold"], ["same"]),   # pixels differ by >= 1/16
             helper.make_node("Cast", ["same"], ["hit"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["hit", "labels"], ["logits"])]
    inits = [const("memory_t", flat.T.copy()), const("memory_sq", (flat ** 2).sum(axis=1)[None, :]),
             const("two", np.array(2.0, np.float32)), const("threshold", np.array(1e-3, np.float32)),
             const("labels", onehot)]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "lookup", [value("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
                              [value("logits", TensorProto.FLOAT, ["n", 10])], inits)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    (folder / "candidate.json").write_text(json.dumps({"input_shape": [1, 8, 8], "dtype": "float32",
                                                       "classes": list(DIGITS[2])}))
    return folder


@pytest.fixture
def memorizing(tmp_path: Path, mlflow_template: Path) -> dict[str, Path]:
    """The config, a candidate memorizing digits' public test split (the repository's loader, seed 0), and a
    held-out .npz of examples it never saw (from the training split, as the service would keep aside)."""
    from models.datasets import digits

    splits = digits(seed=0)
    config = fast_config(epochs=1, lean=True)
    config["models"] = {"digits_mlp": config["models"]["digits_mlp"]}
    config["workdir"] = str(tmp_path / "work")
    seed_mlflow_store(tmp_path / "work", mlflow_template)
    held_out = tmp_path / "held-out" / "digits_mlp.npz"
    held_out.parent.mkdir()
    np.savez(held_out, x=splits.x_train[:300], y=splits.y_train[:300])
    return {"config": write_config(tmp_path, config), "held_out": held_out,
            "candidate": lookup_table_candidate(tmp_path / "candidate", splits.x_test, splits.y_test)}


def judged(capsys: pytest.CaptureFixture[str], files: dict[str, Path], *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "run", "--config", str(files["config"]), "--model", "digits_mlp", "--trigger", "pr",
                   "--pr", "7", "--judge", str(files["candidate"]), "--json", *extra)


def test_a_lookup_table_of_the_public_test_split_scores_at_chance_on_the_held_out_set(
        memorizing: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import last_json

    _, out, err = judged(capsys, memorizing)   # the public split: memorized, and it passes
    public = last_json(out)
    assert public["metrics"]["accuracy"] > 0.99 and public["gate"]["passed"], err[-2000:]
    assert "public" in public["judged"]["test_split"]
    report = Path(public["reports"]["md"]).read_text()   # and the report says so to the PR's reader
    assert "on the base branch's public (the repository's loader and seed rebuild it" in report
    code, out, err = judged(capsys, memorizing, "--held-out", str(memorizing["held_out"]))
    held = last_json(out)
    assert held["metrics"]["accuracy"] < 0.25 and not held["gate"]["passed"] and code == 3, err[-2000:]
    assert held["judged"]["test_split"].startswith("the service's held-out (digits_mlp.npz: 300 examples")
    assert "on the service's held-out (digits_mlp.npz: 300 examples" in Path(held["reports"]["md"]).read_text()


@pytest.mark.parametrize("broken", ["shape", "dtype", "label", "lengths", "no-y", "not-npz"])
def test_a_held_out_set_that_breaks_the_data_contract_is_refused_in_one_line(
        memorizing: dict[str, Path], capsys: pytest.CaptureFixture[str], broken: str) -> None:
    path = memorizing["held_out"]
    x, y = np.load(path)["x"], np.load(path)["y"]
    arrays = {"shape": {"x": x.reshape(len(x), 64), "y": y}, "dtype": {"x": x.astype(np.float64), "y": y},
              "label": {"x": x, "y": np.where(y == 3, 10, y)}, "lengths": {"x": x, "y": y[:-1]},
              "no-y": {"x": x}}.get(broken)
    if arrays is None:
        path.write_bytes(b"not a zip")
    else:
        np.savez(path, **arrays)
    code, _, err = judged(capsys, memorizing, "--held-out", str(path))
    lines = [line for line in error_lines(err) if not line.startswith("Hint:")]
    assert code not in (0, 3) and len(lines) == 1 and "held-out set digits_mlp.npz" in lines[0], err[-2000:]
    assert "Traceback" not in err


def test_only_the_judge_takes_a_held_out_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "run", "--config", str(write_config(tmp_path)), "--model", "digits_mlp",
                           "--export-candidate", str(tmp_path / "out"), "--held-out", str(tmp_path / "x.npz"))
    assert code == 2 and "--held-out needs --judge" in err


def test_the_service_mounts_the_held_out_set_for_the_judge_only(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """LocalExecutor._judge: the held-out file is a read-only mount and a flag of the judge's sandbox."""
    from automation.config import load_config
    from automation.errors import UsageError
    from triggers.jobs.executors import LocalExecutor

    (tmp_path / "held").mkdir()
    np.savez(tmp_path / "held" / "digits_mlp.npz", x=np.zeros((2, 1, 8, 8), np.float32), y=np.zeros(2, np.int64))
    raw = fast_config() | {"workdir": str(tmp_path / "state"),
                           "service": {"checkout": "in_place", "held_out_dir": str(tmp_path / "held")}}
    (tmp_path / "repo").mkdir()
    config_file = write_config(tmp_path / "repo", raw)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(LocalExecutor, "_sandboxed", lambda self, tree, config_file, args, read_only, *rest:
                        seen.update(args=args, read_only=read_only))
    job = type("Job", (), {"id": "j1", "model": "digits_mlp"})()
    LocalExecutor(load_config(config_file), str(config_file))._judge(   # type: ignore[arg-type]
        tmp_path / "cand", tmp_path / "snap", ["--model", "digits_mlp"], tmp_path, job, None, tmp_path / "log",
        None)  # type: ignore[arg-type]
    held = (tmp_path / "held" / "digits_mlp.npz").resolve()
    assert seen["args"][-2:] == ["--held-out", str(held)] and held in seen["read_only"]
    for service, message in (({"held_out_dir": "relative/dir"}, "held_out_dir must be an absolute path"),
                             ({"held_outdir": "/x"}, "held_outdir")):   # strict: a misspelt key is refused
        with pytest.raises(UsageError, match=message):
            load_config(write_config(tmp_path / "repo", raw | {"service": service}))


def test_a_held_out_set_the_build_could_read_is_refused(tmp_path: Path) -> None:
    """The build's sandbox mounts its tree (in place: the service's repository) and service.sandbox_read_only:
    a held-out set under either is one the build can read, then memorize."""
    from automation.config import load_config
    from automation.errors import UsageError

    (tmp_path / "repo").mkdir()
    service = {"checkout": "in_place", "held_out_dir": str(tmp_path / "repo" / "held")}
    with pytest.raises(UsageError, match=r"held_out_dir .*/repo/held is inside the repository"):
        load_config(write_config(tmp_path / "repo", fast_config() | {"service": service}))
    service = {"held_out_dir": str(tmp_path / "data" / "held"), "sandbox_read_only": [str(tmp_path / "data")]}
    with pytest.raises(UsageError, match=r"held_out_dir is inside sandbox_read_only's .*/data'"):
        load_config(write_config(tmp_path / "repo", fast_config() | {"service": service}))
    service["sandbox_read_only"] = [str(tmp_path / "data" / "train")]   # a sibling folder is the build's to read
    assert load_config(write_config(tmp_path / "repo", fast_config() | {"service": service})).service.held_out_dir


def test_a_text_models_held_out_texts_replace_the_raw_test_split(tmp_path: Path) -> None:
    """A text model's held-out x is strings (unpickled .npz: unicode); the candidate's tokenizer encodes them."""
    from types import SimpleNamespace

    from automation.errors import UsageError
    from automation.job import held_out_stage
    from automation.data import Splits

    texts = np.array(["one text", "another"], dtype=object)
    raw = Splits(texts, np.array([0, 1]), texts, np.array([0, 1]), texts, np.array([0, 1]), ("a", "b"))
    encoded = Splits(*(np.zeros((2, 4), np.int64), np.array([0, 1])) * 3, ("a", "b"))
    validated = SimpleNamespace(kind="text", raw=raw, splits=encoded, held_out=None)
    np.savez(tmp_path / "news.npz", x=np.array(["held", "out", "texts"]), y=np.array([1, 0, 1]))
    held_out_stage(tmp_path / "news.npz", validated)   # type: ignore[arg-type]
    assert list(validated.raw.x_test) == ["held", "out", "texts"] and list(validated.raw.y_test) == [1, 0, 1]
    assert validated.raw.x_test.dtype == object and validated.splits is encoded and "3 examples" in validated.held_out
    np.savez(tmp_path / "news.npz", x=np.zeros((3, 4), np.int64), y=np.array([1, 0, 1]))   # ids, not texts
    with pytest.raises(UsageError, match="x is int64 \\[4\\] per example; the data contract says object \\[\\]"):
        held_out_stage(tmp_path / "news.npz", validated)   # type: ignore[arg-type]


@pytest.mark.parametrize("trap", ["linked folder", "linked model"])
def test_the_judge_takes_the_candidate_as_the_service_does_links_refused(
        trap: str, tmp_path: Path, mlflow_template: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A candidate left on a volume the build wrote (Kubernetes) or in an artifact it uploaded (Actions): the
    judge copies the allowed files first, regular and bounded, following no link, then reads its copy."""
    config = fast_config(epochs=1)
    config["workdir"] = str(tmp_path / "work")
    seed_mlflow_store(tmp_path / "work", mlflow_template)
    path = write_config(tmp_path, config)
    real = looping_candidate(tmp_path / "real")
    (tmp_path / "exchange").mkdir()
    candidate = tmp_path / "exchange" / "candidate"
    if trap == "linked folder":   # the build's folder points at whatever the judge's machine holds
        candidate.symlink_to(real, target_is_directory=True)
    else:
        candidate.mkdir()
        for item in real.iterdir():
            (candidate / item.name).write_bytes(item.read_bytes())
        (candidate / "model.onnx").unlink()
        (candidate / "model.onnx").symlink_to(real / "model.onnx")
    code, _, err = run_cli(capsys, "run", "--config", str(path), "--model", "digits_mlp", "--trigger", "pr",
                           "--pr", "7", "--judge", str(candidate), "--json")
    lines = [line for line in error_lines(err) if not line.startswith("Hint:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert ("not a plain folder" if trap == "linked folder" else "model.onnx") in lines[0], lines
