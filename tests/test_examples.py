"""The two real examples end to end, on short configs: Fashion-MNIST images (a ResNet, raw uint8 pixels and
PNG files in) and BBC News text (a Transformer encoder, raw strings in, its tokenizer saved with it). Each
is trained and registered by `mlgate run`, then served: /predict and /v2 (tritonclient) take raw inputs,
bad raw inputs get one-line 4xx answers, and the served tokenizer gives exactly the ids training saw."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from tests.conftest import fast_config, last_json, write_config
from tests.test_serving import Running
from triggers.cli import main

pytestmark = pytest.mark.slow

NEWS_DATA = {"holdout_class": "tech", "unseen_fraction": 0.3}
LEAN = {"variants": ["torch_eager", "onnx_fp32", "onnx_int8"]}


def example_config() -> dict[str, Any]:
    """Seconds of training each: the contract, serving and drift are the point here; what the full configs
    reach is measured by benchmarks/examples.py. The accuracy and latency gates only have to let the version
    through: on 2 cores shared with the other test worker's jobs, a p95 at batch 1 reached 74 ms."""
    config = fast_config(lean=True)
    config["defaults"]["optimize"] = LEAN
    config["defaults"]["benchmark"] = {"batch_sizes": [1, 8], "warmup": 2, "iterations": 20, "rounds": 2}
    config["models"] = {
        "fashion_resnet": {"module": "models.fashion_resnet", "params": {"width": 8, "blocks": 1},
                           "data": {"train_examples": 1200, "test_examples": 1000},
                           "train": {"epochs": 2, "batch_size": 64, "lr": 0.003},
                           "gates": {"absolute": {"min_accuracy": 0.2, "max_p95_latency_ms": 1000}}},
        # trained without one category: its articles are the unseen news the monitor must notice; and without
        # 30 % of the others: news from the same distribution that no split holds, for the false-alarm check
        "news_transformer": {"module": "models.news_transformer", "params": {"dim": 32, "layers": 1},
                             "data": NEWS_DATA,
                             "train": {"epochs": 3, "batch_size": 32, "lr": 0.003},
                             "gates": {"absolute": {"min_accuracy": 0.2, "max_p95_latency_ms": 1000}}},
    }
    return config


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("examples")
    return write_config(directory, example_config())


@pytest.fixture(scope="module")
def jobs(registry: Path) -> dict[str, dict[str, Any]]:
    import contextlib

    summaries = {}
    for model in ("fashion_resnet", "news_transformer"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["--config", str(registry), "run", "--model", model, "--json"], standalone=False) == 0
        summaries[model] = last_json(out.getvalue())
    return summaries


def test_both_examples_train_register_and_say_what_they_take(jobs: dict[str, dict[str, Any]]) -> None:
    image, text = jobs["fashion_resnet"], jobs["news_transformer"]
    assert image["promoted"] and text["promoted"]
    assert image["contract"]["input_kind"] == "image" and image["contract"]["input_dtype"] == "uint8"
    assert image["contract"]["input_shape"] == [28, 28] and image["contract"]["classes"][9] == "Ankle boot"
    assert text["contract"]["input_kind"] == "text" and text["contract"]["input_dtype"] == "string"
    assert text["contract"]["network_input"] == {"shape": [512], "dtype": "int64"}
    # the fingerprint is a manifest of the source files, not a hash of arrays in memory
    assert image["data_sources"]["files"] == 4 and text["data_sources"]["files"] == 1276   # 2,225 less 401 held-out tech, less 548 unseen
    # the text model's variants are timed on its served path: the tokenizer inside the timed region
    assert text["served_path"]["includes"] == "tokenizer" and "1" in text["served_path"]["latency"]


@pytest.fixture(scope="module")
def image_server(registry: Path, jobs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    running = Running(registry, tmp_path_factory.mktemp("image-log"), model="fashion_resnet")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def text_server(registry: Path, jobs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    running = Running(registry, tmp_path_factory.mktemp("text-log"), model="news_transformer")
    yield running
    running.stop()


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_raw_images_as_pixels_and_png_get_the_same_answers(image_server: Running) -> None:
    from models.datasets import fashion_mnist

    images = fashion_mnist(train_examples=100, test_examples=100).x_test[:4]
    by_pixels = httpx.post(image_server.url + "/predict", json={"inputs": images.tolist()}, timeout=10)
    assert by_pixels.status_code == 200, by_pixels.text
    by_png = httpx.post(image_server.url + "/predict", json={"inputs": [
        {"b64": base64.b64encode(png(i)).decode()} for i in images]}, timeout=10)
    assert by_png.status_code == 200, by_png.text
    assert by_png.json()["labels"] == by_pixels.json()["labels"]
    assert all(label in ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot") for label in by_pixels.json()["labels"])
    np.testing.assert_allclose(by_png.json()["logits"], by_pixels.json()["logits"], atol=1e-5)


def test_v2_takes_uint8_tensors_and_png_bytes(image_server: Running) -> None:
    import tritonclient.http as triton

    from models.datasets import fashion_mnist

    images = fashion_mnist(train_examples=100, test_examples=100).x_test[:3]
    client = triton.InferenceServerClient(url=image_server.url.removeprefix("http://"))
    health = httpx.get(image_server.url + "/healthz", timeout=5).json()
    assert health["input_kind"] == "image" and health["input_shape"] == [28, 28]
    metadata = client.get_model_metadata("fashion_resnet")
    assert metadata["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 28, 28]}]
    assert metadata["parameters"]["input_kind"] == "image"
    expected = httpx.post(image_server.url + "/predict", json={"inputs": images.tolist()}, timeout=10).json()
    pixels = triton.InferInput("input", list(images.shape), "UINT8")
    pixels.set_data_from_numpy(images, binary_data=True)
    files = triton.InferInput("input", [3], "BYTES")
    files.set_data_from_numpy(np.array([png(i) for i in images], dtype=object), binary_data=True)
    for tensor in (pixels, files):
        result = client.infer("fashion_resnet", [tensor])
        assert [s.decode() for s in result.as_numpy("labels")] == expected["labels"]


def test_bad_raw_images_get_one_line_4xx(image_server: Running) -> None:
    def post(body: Any) -> httpx.Response:
        return httpx.post(image_server.url + "/predict", json=body, timeout=10)

    cases = {
        "wrong size": ({"inputs": [{"b64": base64.b64encode(png(np.zeros((32, 32), np.uint8))).decode()}]}, 422,
                       "example 0: the image is 32×32, the model takes 28×28"),
        "wrong pixel shape": ({"inputs": [[[0] * 27] * 28]}, 422, "examples must have shape [28, 28]; got [28, 27]"),
        "pixel out of range": ({"inputs": [[[300] * 28] * 28]}, 422, "out of range for uint8"),
        "not an image": ({"inputs": [{"b64": base64.b64encode(b"GIF89a not really").decode()}]}, 422,
                         "not a readable PNG or JPEG file"),
        "bad base64": ({"inputs": [{"b64": "***"}]}, 422, "not valid base64"),
        "mixed": ({"inputs": [{"b64": "AAAA"}, [[0] * 28] * 28]}, 422, "send every image as"),
    }
    for name, (body, status, message) in cases.items():
        response = post(body)
        assert response.status_code == status, (name, response.text)
        assert message in response.json()["error"] and "\n" not in response.json()["error"], (name, response.json())
    # a body is refused by its size before it is read whole: 33 MiB of base64 is over any image request
    huge = httpx.post(image_server.url + "/predict", content=b'{"inputs": [{"b64": "' + b"A" * (33 * 2**20) + b'"}]}',
                      timeout=30)
    assert huge.status_code == 413
    big_file = base64.b64encode(b"\x89PNG" + bytes(70 * 1024)).decode()   # a 28×28 image needs no 70 KiB
    assert post({"inputs": [{"b64": big_file}]}).status_code == 413
    # bodies over 16 KiB are parsed on the inference threads: hostile ones still get one line, and the threads
    # go on serving
    pixels = [[[7] * 28] * 28] * 32
    deep = b'{"inputs": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    v2 = image_server.url + "/v2/models/fashion_resnet/infer"
    flat = [7] * (32 * 28 * 28)

    def tensor(data: list[Any], datatype: str = "UINT8") -> dict[str, Any]:
        return {"inputs": [{"name": "input", "shape": [32, 28, 28], "datatype": datatype, "data": data}]}

    hostile = {
        "/predict, nested 20,000 deep": (image_server.url + "/predict", deep, 400, "not valid JSON"),
        "/predict, a string among the pixels": (image_server.url + "/predict", orjson.dumps(
            {"inputs": pixels[:31] + [[["é"] * 28] * 28]}), 422, 'holds a string ("é")'),
        "/predict, half a pixel": (image_server.url + "/predict", orjson.dumps(
            {"inputs": pixels[:31] + [[[0.5] * 28] * 28]}), 422, "value 0.5 is not a whole number"),
        "/v2, nested 20,000 deep": (v2, deep, 400, "not valid JSON"),
        "/v2, a huge number": (v2, orjson.dumps(tensor(flat[:-1])).replace(b"7]", b"1" * 400 + b"]"), 400,
                               "not valid JSON"),
        "/v2, a string in the data": (v2, orjson.dumps(tensor(flat[:-1] + ["\u202e"])), 422, "a string"),
        "/v2, floats as UINT8": (v2, orjson.dumps(tensor([0.5] * len(flat))), 422,
                                 "element 0 of the input: value 0.5 is not a whole number, as UINT8 needs"),
    }
    for name, (url, body, status, message) in hostile.items():
        assert len(body) > 16 * 1024, name
        response = httpx.post(url, content=body, timeout=30)
        assert response.status_code == status, (name, response.text[:300])
        error = response.json()["error"]
        assert message in error and "\n" not in error and "Traceback" not in error, (name, error)
    assert post({"inputs": pixels}).status_code == 200
    assert httpx.post(v2, content=orjson.dumps(tensor(flat)), timeout=30).status_code == 200


def test_raw_text_on_predict_and_v2_with_the_training_tokenizer(text_server: Running, jobs: dict[str, Any],
                                                                registry: Path) -> None:
    import tritonclient.http as triton

    from automation.preprocess import TextEncoder
    from models.datasets import bbc_news

    texts = list(bbc_news().x_test[:4])
    answer = httpx.post(text_server.url + "/predict", json={"inputs": texts}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert set(answer.json()["labels"]) <= {"business", "entertainment", "politics", "sport", "tech"}
    client = triton.InferenceServerClient(url=text_server.url.removeprefix("http://"))
    assert client.get_model_metadata("news_transformer")["inputs"] == [
        {"name": "input", "datatype": "BYTES", "shape": [-1]}]
    for binary in (True, False):
        tensor = triton.InferInput("input", [len(texts)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=binary)
        result = client.infer("news_transformer", [tensor])
        assert [s.decode() for s in result.as_numpy("labels")] == answer.json()["labels"]
    # parity: the served version's tokenizer is the job's, id for id
    served = text_server.server.current.loaded.encoder
    trained = TextEncoder.load(Path(jobs["news_transformer"]["tokenizer"]))
    assert np.array_equal(served.encode(texts), trained.encode(texts))


def test_bad_raw_text_gets_one_line_4xx(text_server: Running) -> None:
    url = text_server.url
    cases = {
        "empty text": (json.dumps({"inputs": ["  "]}).encode(), 422, "example 0 is empty"),
        "huge text": (json.dumps({"inputs": ["word " * 20_000]}).encode(), 413, "over the limit of 65,536"),
        "a number": (json.dumps({"inputs": [12]}).encode(), 422, "send the text as a string"),
        "not UTF-8": (b'{"inputs": ["caf\xe9"]}', 400, "not valid JSON"),
    }
    for name, (body, status, message) in cases.items():
        response = httpx.post(url + "/predict", content=body, timeout=10)
        assert response.status_code == status, (name, response.text)
        assert message in response.json()["error"], (name, response.json())
    head = json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 8}}]}).encode()
    not_utf8 = httpx.post(url + "/v2/models/news_transformer/infer", content=head + (4).to_bytes(4, "little") +
                          b"\xff\xfe\xfd\xfc", headers={"Inference-Header-Content-Length": str(len(head))}, timeout=10)
    assert not_utf8.status_code == 422 and "element 0 is not UTF-8 text" in not_utf8.json()["error"]
    cut = httpx.post(url + "/v2/models/news_transformer/infer", content=head + (9).to_bytes(4, "little") + b"abcd",
                     headers={"Inference-Header-Content-Length": str(len(head))}, timeout=10)
    assert cut.status_code == 400 and "claims 9 bytes" in cut.json()["error"]


# --- drift on embeddings -------------------------------------------------------------------------------------

def log_window(directory: Path, x: Any, version: str, columns: tuple[str, ...] | None) -> Path:
    """Inputs written as serving writes them (the inference log's Parquet files)."""
    from triggers.serving.inference_log import InferenceLog

    log = InferenceLog(directory, rows_per_file=10_000, flush_seconds=60)
    log.append(np.asarray(x, dtype=object) if columns == ("text",) else x, np.zeros(len(x), dtype=np.int64),
               version, features=columns)
    log.close()
    return directory


def unseen_images(count: int, offset: int = 0) -> np.ndarray:
    """Fashion-MNIST test images outside the job's test subset (it took 1,000 of the 10,000)."""
    from models.datasets import fashion_mnist

    used = set(fashion_mnist(train_examples=1200, test_examples=1000).x_test.reshape(1000, -1).sum(1).tolist())
    every = fashion_mnist(train_examples=1200).x_test
    fresh = np.array([i for i in range(len(every)) if int(every[i].sum()) not in used])
    return every[fresh[offset:offset + count]]


def test_the_monitor_sees_rotated_and_brightened_images_and_not_unshifted_ones(registry: Path, jobs: Any,
                                                                             tmp_path: Path) -> None:
    from automation.config import load_config
    from triggers.drift.monitor import run_monitor

    config = load_config(registry)
    version = jobs["fashion_resnet"]["version"]
    images = unseen_images(400)
    windows = {"unshifted": images, "rotated": np.rot90(images, 1, axes=(1, 2)).copy(),
               "brightened": np.clip(images.astype(np.int16) + 90, 0, 255).astype(np.uint8)}
    results = {}
    for name, x in windows.items():
        window = log_window(tmp_path / name, x.reshape(len(x), -1), version, None)
        results[name] = run_monitor(config, "fashion_resnet", window, publish=False)
    assert results["unshifted"]["tested"] and not results["unshifted"]["retrain"], results["unshifted"]
    for name in ("rotated", "brightened"):
        assert results[name]["retrain"], results[name]
        assert results[name]["compared"] == "embeddings"
    assert Path(results["rotated"]["report"]).read_text(encoding="utf-8").count("embeddings") > 0


def test_embedding_drift_stays_quiet_on_twenty_unshifted_windows(registry: Path, jobs: Any) -> None:
    """The false-alarm rate: 20 windows of images from the same distribution, none seen by the reference."""
    import mlflow.pytorch

    from automation.config import load_config
    from automation.embeddings import embed
    from triggers.drift.monitor import load_reference
    from triggers.drift.embeddings import embedding_auc_threshold, embedding_drift_score

    reference = load_reference(load_config(registry), "fashion_resnet")
    model = mlflow.pytorch.load_model(reference.torch_uri, map_location="cpu")
    pool = embed(model, unseen_images(20 * 400))
    scores = [embedding_drift_score(reference.embeddings, pool[i * 400:(i + 1) * 400]) for i in range(20)]
    threshold = embedding_auc_threshold(len(reference.embeddings), 400)
    alarms = sum(score > threshold for score in scores)
    assert alarms == 0, f"{alarms}/20 unshifted windows flagged; ROC AUCs {sorted(scores)[-3:]}"
    rotated = embed(model, np.rot90(unseen_images(400), 1, axes=(1, 2)).copy())
    assert embedding_drift_score(reference.embeddings, rotated) > 0.9   # the same check does see a real shift


def test_the_monitor_sees_an_unseen_news_category_and_noisy_text(registry: Path, jobs: Any, tmp_path: Path) -> None:
    from automation.config import load_config
    from models.datasets import bbc_news_unseen, read_bbc_news
    from triggers.drift.monitor import run_monitor

    config = load_config(registry)
    version = jobs["news_transformer"]["version"]
    texts, labels, _ = read_bbc_news()
    tech = [t for t, label in zip(texts, labels) if label == "tech"][:300]
    unseen = bbc_news_unseen(**NEWS_DATA)[0]   # in file order, which is class by class: drawn at random
    rng = np.random.default_rng(0)
    known = list(unseen[rng.choice(len(unseen), 300, replace=False)])
    noisy = ["".join(c if rng.random() > 0.25 else chr(rng.integers(97, 123)) for c in t) for t in known]
    results = {}
    for name, x in {"unshifted": known, "held-out category": tech, "noisy": noisy}.items():
        results[name] = run_monitor(config, "news_transformer", log_window(tmp_path / name.replace(" ", "-"), x,
                                                                           version, ("text",)), publish=False)
    assert results["unshifted"]["tested"] and not results["unshifted"]["retrain"], results["unshifted"]
    assert results["unshifted"]["compared"] == "embeddings and text descriptors"
    for name in ("held-out category", "noisy"):
        assert results[name]["retrain"], results[name]
    report = json.loads(Path(results["noisy"]["report"]).with_suffix(".json").read_text())
    assert {c["column"] for c in report["event"]["data"]["drifted_columns"]} >= {"embeddings", "oov_share"}


def test_text_drift_stays_quiet_on_twenty_unshifted_windows(registry: Path, jobs: Any, tmp_path: Path) -> None:
    """The false-alarm rate for text: 20 windows of 100 articles that no split held (the reference is validation
    and test), each through the monitor's tests: embeddings and both descriptors."""
    from automation.config import load_config
    from models.datasets import bbc_news_unseen
    from triggers.drift.monitor import load_reference
    from triggers.drift.embeddings import drift_tests, embed_window, signal_share

    config = load_config(registry)
    reference = load_reference(config, "news_transformer")
    texts, _ = bbc_news_unseen(**NEWS_DATA)
    rng = np.random.default_rng(1)
    threshold = config.model("news_transformer").drift.threshold
    embeddings, descriptors = embed_window(reference, texts, tmp_path / "model")   # the pool, once
    alarms, worst = 0, []
    for _ in range(20):
        rows = rng.choice(len(texts), 100, replace=False)
        tests = drift_tests(reference, embeddings[rows], {k: v[rows] for k, v in descriptors.items()},
                            picture=False)[1]
        alarms += signal_share(tests) >= threshold
        worst.append({t["column"]: round(t["score"], 5) for t in tests})
    assert alarms == 0, f"{alarms}/20 unshifted windows flagged: {worst}"
    assert all(scores.keys() == {"embeddings", "oov_share", "text_length", "uppercase_share", "unknown_token_share",
                                 "known_bigram_share"} for scores in worst)


# --- reports -------------------------------------------------------------------------------------------------

def test_reports_name_classes_show_the_confusion_and_the_misclassified_examples(jobs: Any, tmp_path: Path) -> None:
    from tests.conftest import headless_chromium

    image, text = jobs["fashion_resnet"], jobs["news_transformer"]
    markdown = Path(image["reports"]["md"]).read_text(encoding="utf-8")
    assert "| true / predicted | T-shirt/top | Trouser |" in markdown and "| **Ankle boot** |" in markdown
    matrix = image["errors"]["confusion"]
    assert sum(map(sum, matrix)) == image["contract"]["test_examples"]
    assert sum(matrix[i][i] for i in range(10)) / sum(map(sum, matrix)) == pytest.approx(image["metrics"]["accuracy"])
    page = Path(image["reports"]["html"]).read_text(encoding="utf-8")
    assert '<img alt="misclassified test images" src="data:image/png;base64,' in page
    text_page = Path(text["reports"]["html"]).read_text(encoding="utf-8")
    assert "<ul class='snippets'>" in text_page and " → " in text_page
    shot = tmp_path / "report.png"
    headless_chromium(tmp_path / "profile", "--window-size=1300,4000", f"--screenshot={shot}",
                      Path(image["reports"]["html"]).as_uri())
    from PIL import Image

    with Image.open(shot) as picture:   # rendered: the page has content well below its first screen
        grey = np.asarray(picture.convert("L"))
    assert grey.shape == (4000, 1300) and (grey[2000:] < 200).mean() > 0.01


def test_a_misclassified_snippet_is_escaped() -> None:
    from automation.report import _misclassified

    summary = {"contract": {"input_kind": "text", "classes": ["a", "<b>"]},
               "errors": {"misclassified": [[0, 1, 0]]}}
    page = _misclassified(summary, np.array(["<script>alert(1)</script> & more"], dtype=object))
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    assert "&lt;b&gt; → a" in page
