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
import pytest

from tests.conftest import fast_config, last_json, write_config
from tests.test_serving import Running
from triggers.cli import main

pytestmark = pytest.mark.slow

LEAN = {"variants": ["torch_eager", "onnx_fp32", "onnx_int8"]}


def example_config() -> dict[str, Any]:
    """Seconds of training each: the contract, serving and drift are the point here; what the full configs
    reach is measured by benchmarks/examples.py. The accuracy gate only has to let the version through."""
    config = fast_config(lean=True)
    config["defaults"]["optimize"] = LEAN
    config["defaults"]["benchmark"] = {"batch_sizes": [1, 8], "warmup": 2, "iterations": 20, "rounds": 2}
    config["models"] = {
        "fashion_resnet": {"module": "models.fashion_resnet", "params": {"width": 8, "blocks": 1},
                           "data": {"train_examples": 1200, "test_examples": 300},
                           "train": {"epochs": 2, "batch_size": 64, "lr": 0.003},
                           "gates": {"absolute": {"min_accuracy": 0.2}}},
        "news_transformer": {"module": "models.news_transformer", "params": {"dim": 32, "layers": 1},
                             "train": {"epochs": 3, "batch_size": 32, "lr": 0.003},
                             "gates": {"absolute": {"min_accuracy": 0.2}}},
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
    assert text["contract"]["network_input"] == {"shape": [256], "dtype": "int64"}
    # the fingerprint is a manifest of the source files, not a hash of arrays in memory
    assert image["data_sources"]["files"] == 4 and text["data_sources"]["files"] == 2225
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
