"""Memory a job holds stays proportional to its model and data: what made the news transformer's job peak at
5.2 GB does not come back. No timings and no process-wide figures here: each test checks one mechanism."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from automation.benchmark import resident_memory_mb
from automation.optimize import export_onnx
from automation.predictors import EncodingPredictor, OnnxPredictor, evaluate, predict
from automation.preprocess import ENCODE_CHUNK, Tokenize
from models import news_transformer


class Calls:
    """A predictor that records which of its calls ran."""

    device, memory_kind = None, "host_rss"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def prepare(self, x: Any) -> Any:
        return np.asarray(x, dtype=np.float32)

    def run(self, prepared: Any) -> Any:
        self.calls.append("run")
        return prepared[:, :2]

    def run_untimed(self, prepared: Any) -> Any:
        self.calls.append("untimed")
        return prepared[:, :2]

    def to_numpy(self, output: Any) -> np.ndarray:
        return output


def test_an_evaluation_pass_makes_untimed_calls_and_serving_timed_ones() -> None:
    x = np.ones((70, 3))
    evaluated, served = Calls(), Calls()
    assert evaluate(evaluated, x).shape == predict(served, x).shape == (70, 2)
    assert set(evaluated.calls) == {"untimed"} and set(served.calls) == {"run"}

    class Encoder:
        def encode(self, texts: list[str]) -> np.ndarray:
            return np.ones((len(texts), 3))

    inner = Calls()
    evaluate(EncodingPredictor(inner, Encoder()), np.array(["a", "b"], dtype=object))
    assert inner.calls == ["untimed"]   # a text model's served path passes it on to its network


def _wide_graph(path: Path, width: int) -> Path:
    """x (n, 64) → MatMul → (n, width) → ReduceSum: a large intermediate only the arena holds."""
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [64, width], np.full(64 * width, 0.01, np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["wide"]),
         helper.make_node("ReduceSum", ["wide"], ["logits"], keepdims=1)], "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_an_untimed_call_gives_back_the_scratch_a_timed_call_keeps(tmp_path: Path) -> None:
    predictor = OnnxPredictor(_wide_graph(tmp_path / "wide.onnx", 8192))
    # batch 1 first, as the job warms a variant: the arena never gives back its first region
    predictor.run(predictor.prepare(np.ones((1, 64), np.float32)))
    batch = predictor.prepare(np.ones((4096, 64), np.float32))   # a 128 MiB intermediate
    predictor.run(batch)
    kept = resident_memory_mb()
    predictor.run_untimed(batch)
    assert resident_memory_mb() < kept - 64, "the arena still holds the intermediate after an untimed call"
    options = predictor.session.get_session_options()
    assert not options.enable_mem_pattern   # a planned block per batch size doubled what each size held


def test_sessions_made_to_share_use_the_process_arena(tmp_path: Path) -> None:
    path = _wide_graph(tmp_path / "wide.onnx", 16)
    shared, own = OnnxPredictor(path, shared_arena=True), OnnxPredictor(path)
    assert shared.session.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):   # set for nothing else
        own.session.get_session_options().get_session_config_entry("session.use_env_allocators")
    x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    np.testing.assert_allclose(evaluate(shared, x), evaluate(own, x), rtol=1e-6)


def test_the_news_transformer_exports_attention_without_a_nan_guard(tmp_path: Path) -> None:
    """A boolean attention mask exports with IsNaN and Where over every batch × heads × length² weight (for rows
    that attend to nothing); the model's additive mask does not, and still answers a text of padding only."""
    import onnx

    torch.manual_seed(0)
    model = news_transformer.build(vocab_size=50, input_shape=(24,), num_classes=3, dim=16, heads=2, layers=1).eval()
    ids = torch.randint(2, 50, (3, 24))
    ids[1, 10:] = news_transformer.PAD_ID
    ids[2] = news_transformer.PAD_ID   # an empty text
    path = export_onnx(model, (24,), tmp_path / "news.onnx", np.int64)
    assert "IsNaN" not in {node.op_type for node in onnx.load(path).graph.node}
    with torch.no_grad():
        expected = model(ids).numpy()
    exported = evaluate(OnnxPredictor(path), ids.numpy())
    assert np.isfinite(exported).all()
    np.testing.assert_allclose(exported, expected, atol=1e-4)


@pytest.mark.parametrize("count", [0, 1, ENCODE_CHUNK, ENCODE_CHUNK + 3])
def test_tokenizing_in_chunks_gives_the_ids_of_one_batch(count: int) -> None:
    texts = [f"article {i} about markets, films and {i % 7} elections" * (1 + i % 3) for i in range(count)]
    encoder = Tokenize(vocab_size=100, max_length=12).fit(texts or ["an empty corpus"])
    ids = encoder.encode(texts)
    assert ids.shape == (count, 12) and ids.dtype == np.int64
    whole = [e.ids for e in encoder.tokenizer.encode_batch(texts)]
    assert ids.tolist() == whole
