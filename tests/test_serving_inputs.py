"""What a served version takes and says, checked on a real `serve-model` (uvicorn on a port) of a small
tabular version that names its features and classes (trained once for the module by `mlgate run`):
one-line 4xx answers for values that are not numbers or do not fit (never a numpy warning), records keyed
by feature name, class names in answers (/predict, /v2 metadata and a tritonclient `labels` output), and
the inference log's columns."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import fast_config, write_config
from tests.test_serving import Running
from triggers.cli import main

pytestmark = pytest.mark.slow

MODEL = "cellar"
FEATURES = ("alcohol", "malic_acid", "color intensity", "proline")
CLASSES = ("barbera", "barolo", "grignolino")   # sorted: the order the contract gives them indices in

TABULAR_MODEL = '''"""Three well-separated cultivars, four named features on different scales, string labels."""
import numpy as np
import pandas as pd
from torch import nn

preprocess = "standardize"


def load_data(rows: int = 300):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, rows)
    x = rng.normal(size=(rows, 4)) + 3.0 * np.eye(3, 4)[y]
    frame = pd.DataFrame(x * [1.0, 1.0, 10.0, 500.0] + [13.0, 2.0, 50.0, 800.0],
                         columns=["alcohol", "malic_acid", "color intensity", "proline"])
    frame["label"] = np.array(["barolo", "grignolino", "barbera"])[y]
    return frame


def build(input_shape, num_classes, hidden: int = 16):
    return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
'''


@pytest.fixture(scope="module")
def tabular(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registered, promoted version of the tabular model (ONNX only: serving is the point here)."""
    directory = tmp_path_factory.mktemp("serving_inputs")
    (directory / "cellar_model.py").write_text(TABULAR_MODEL)
    config = fast_config(epochs=8)
    config["defaults"]["optimize"] = {"variants": ["onnx_fp32"]}
    config["defaults"]["benchmark"] = {"batch_sizes": [1], "warmup": 2, "iterations": 20, "rounds": 3}
    config["models"] = {MODEL: {"module": "cellar_model"}}
    path = write_config(directory, config)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(directory))
        assert main(["--config", str(path), "run", "--model", MODEL], standalone=False) == 0
        sys.modules.pop("cellar_model", None)
    return path


@pytest.fixture(scope="module")
def served(tabular: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    running = Running(tabular, tmp_path_factory.mktemp("inference"), model=MODEL)
    yield running
    running.stop()


def records(count: int) -> list[dict[str, float]]:
    """One clear example of each class in turn: barolo, grignolino, barbera, barolo, …"""
    centres = {"barolo": [16.0, 2.0, 50.0, 800.0], "grignolino": [13.0, 5.0, 50.0, 800.0],
               "barbera": [13.0, 2.0, 80.0, 800.0]}
    names = ["barolo", "grignolino", "barbera"]
    return [dict(zip(FEATURES, centres[names[i % 3]])) for i in range(count)]


def post(served: Running, body: Any, path: str = "/predict", **kwargs: Any) -> httpx.Response:
    """A request, with any numpy warning in this process turned into a failure of the test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if isinstance(body, bytes):
            response = httpx.post(served.url + path, content=body, timeout=10, **kwargs)
        else:
            response = httpx.post(served.url + path, json=body, timeout=10, **kwargs)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    return response


def rows(count: int) -> list[list[float]]:
    return [[r[f] for f in FEATURES] for r in records(count)]


def test_values_that_are_not_numbers_or_do_not_fit_get_one_line_4xx(served: Running,
                                                                     capfd: pytest.CaptureFixture[str]) -> None:
    good = rows(3)
    cases = {
        "null": ({"inputs": [[14.2, 1.7, 50.0, None]]}, "example 0 holds null at [3]: send numbers"),
        "true among numbers": ({"inputs": [*good[:2], [True, 1.7, 50.0, 800.0]]},
                               "example 2 holds a boolean (true) at [0]: send numbers"),
        "false alone": ({"inputs": [[False] * 4]}, "example 0 holds a boolean (false) at [0]: send numbers"),
        "a string": ({"inputs": [good[0], [14.2, "1.7", 50.0, 800.0]]},
                     'example 1 holds a string ("1.7") at [1]: send numbers'),
        "an object": ({"inputs": [good[0], [14.2, {"v": 1}, 50.0, 800.0]]},
                      "example 1 holds an object at [1]: send numbers"),
        "null example": ({"inputs": [good[0], None]}, "example 1 is null: send numbers"),
        "past float32": (b'{"inputs": [[14.2, 1.7, 50.0, 800.0], [14.2, 1.7, 1e40, 800.0]]}',
                         "example 1 at [2]: value 1e+40 is out of range for float32"),
        "negative, past float32": (b'{"inputs": [[-3.5e38, 1.7, 50.0, 800.0]]}',
                                   "example 0 at [0]: value -3.5e+38 is out of range for float32"),
        "array beside records": ({"inputs": [good[0], records(1)[0]]},
                                 "example 1 is an object: send every example as an array shaped [4], or every "
                                 "one as a record keyed by feature name"),
    }
    for name, (body, message) in cases.items():
        response = post(served, body)
        assert (response.status_code, response.json()) == (422, {"error": message}), name
    # a number past int64 is still a number, and fits float32: answered
    big = post(served, b'{"inputs": [[14, 2, 50, 800], [-1, 2, 50, 9223372036854775808]]}')
    assert big.status_code == 200, big.text
    assert "Warning" not in capfd.readouterr().err          # nothing printed by numpy either


def test_records_by_feature_name_and_class_names_in_answers(served: Running) -> None:
    sent = records(6)
    shuffled = [dict(reversed(list(r.items()))) for r in sent]     # key order is not the features' order
    by_name = post(served, {"inputs": shuffled})
    by_position = post(served, {"inputs": rows(6)})
    assert by_name.status_code == by_position.status_code == 200, by_name.text
    answer = by_name.json()
    assert answer["labels"] == ["barolo", "grignolino", "barbera"] * 2
    assert answer["predictions"] == [CLASSES.index(label) for label in answer["labels"]]
    assert answer["predictions"] == by_position.json()["predictions"]
    np.testing.assert_allclose(answer["logits"], by_position.json()["logits"], atol=1e-4)
    logits = np.asarray(answer["logits"], dtype=np.float64)
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(answer["probabilities"], (softmax / softmax.sum(axis=1, keepdims=True)).max(axis=1),
                               atol=1e-4)
    assert all(p > 0.5 for p in answer["probabilities"])


def test_bad_records_name_the_record_and_the_key(served: Running) -> None:
    good = records(2)
    missing = {k: v for k, v in good[1].items() if k != "malic_acid"}
    cases = {
        "missing": ([good[0], missing], 'record 1 lacks the feature "malic_acid"'),
        "unknown": ([good[0] | {"colour": 3.0}], 'record 0 has an unknown key "colour" (the features: alcohol, '
                                                 'malic_acid, color intensity, proline)'),
        "string": ([good[0] | {"proline": "high"}], 'record 0 holds a string ("high") for "proline": send numbers'),
        "null": ([good[0], good[1] | {"alcohol": None}], 'record 1 holds null for "alcohol": send numbers'),
        "boolean": ([good[0] | {"color intensity": True}],
                    'record 0 holds a boolean (true) for "color intensity": send numbers'),
        "array among records": ([good[0], rows(1)[0]], "example 1 is not a record: send every example as an object "
                                                      "keyed by feature name, or every one as an array"),
    }
    for name, (inputs, message) in cases.items():
        response = post(served, {"inputs": inputs})
        assert (response.status_code, response.json()) == (422, {"error": message}), name
    huge = b'{"inputs": [{"alcohol": 1e39, "malic_acid": 1, "color intensity": 1, "proline": 1}]}'
    response = post(served, huge)
    assert (response.status_code, response.json()) == (
        422, {"error": 'record 0 ("alcohol"): value 1e+39 is out of range for float32'})


def test_v2_json_tensors_get_one_line_4xx_for_values_shapes_and_ranges(served: Running) -> None:
    def tensor(data: list[Any], datatype: str = "FP32", shape: list[Any] | None = None) -> dict[str, Any]:
        return {"inputs": [{"name": "input", "shape": shape or [1, 4], "datatype": datatype, "data": data}],
                "outputs": [{"name": "predictions", "parameters": {"binary_data": False}}]}

    path = f"/v2/models/{MODEL}/infer"
    cases = {
        "true": (tensor([14.2, True, 50.0, 800.0]), 422, "element 1 of the input is a boolean (true): send numbers"),
        "null": (tensor([14.2, 1.7, None, 800.0]), 422, "element 2 of the input is null: send numbers"),
        "string": (tensor([14.2, 1.7, 50.0, "800"]), 422, 'element 3 of the input is a string ("800"): send numbers'),
        "nested false": (tensor([[14.2, 1.7], [False, 800.0]]), 422,
                         "element 2 of the input is a boolean (false): send numbers"),
        "INT8 1000": (tensor([14, 2, 50, 1000], "INT8"), 422,
                      "element 3 of the input: value 1000 is out of range for INT8"),
        "UINT64 -1": (tensor([-1, 2, 50, 800], "UINT64"), 422,
                      "element 0 of the input: value -1 is out of range for UINT64"),
        "INT64 2**63": (tensor([14, 2, 50, 2 ** 63], "INT64"), 422,
                        "element 3 of the input: value 9223372036854775808 is out of range for INT64"),
        "FP32 1e40": (tensor([14.2, 1e40, 50.0, 800.0]), 422,
                      "element 1 of the input: value 1e+40 is out of range for FP32"),
        "FP64 1e40, for the float32 model": (tensor([14.2, 1.7, 50.0, 1e40], "FP64"), 422,
                                             "element 3 of the input: value 1e+40 is out of range for float32"),
        "FP16 70000": (tensor([14.2, 1.7, 50.0, 70000], "FP16"), 422,
                       "element 3 of the input: value 70000 is out of range for FP16"),
        # an integer tensor holds whole numbers: a cast would have made 0.5 a 0 without a word
        "INT32 0.5": (tensor([14, 2, 0.5, 800], "INT32"), 422,
                      "element 2 of the input: value 0.5 is not a whole number, as INT32 needs"),
        "INT64 5e-1": (tensor([14, 5e-1, 50, 800], "INT64"), 422,
                       "element 1 of the input: value 0.5 is not a whole number, as INT64 needs"),
        "nested UINT8 2.25": (tensor([[14, 2], [50, 2.25]], "UINT8"), 422,
                              "element 3 of the input: value 2.25 is not a whole number, as UINT8 needs"),
        "shape with true": (tensor([14.2, 1.7, 50.0, 800.0], shape=[1, True, 4]), 400,
                            'the input tensor needs "shape": a list of sizes (whole numbers); got [1,true,4]'),
    }
    for name, (body, status, message) in cases.items():
        response = post(served, body, path)
        assert (response.status_code, response.json()) == (status, {"error": message}), name
    # orjson keeps the last of two "data" keys: the bytes of the first must not vouch for it
    twice = (b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "INT64", "data": [14, 2, 50, 800], '
             b'"data": [14, 2, 50.5, 800]}]}')
    response = httpx.post(served.url + path, content=twice, timeout=10)
    assert (response.status_code, response.json()) == (
        422, {"error": "element 2 of the input: value 50.5 is not a whole number, as INT64 needs"})
    whole = post(served, tensor([14, 2.0, 50, 800], "INT64"), path)   # 2.0 is a whole number
    assert whole.status_code == 200, whole.text
    # binary FP64 past float32's range is named; NaN keeps its own message
    for value, message in ((1e40, "element 0 of the input: value 1e+40 is out of range for float32"),
                           (np.nan, "the input contains NaN or infinity")):
        raw = np.array([[value, 1.7, 50.0, 800.0]], dtype="<f8").tobytes()
        head = ('{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", '
                '"parameters": {"binary_data_size": 32}}]}').encode()
        response = post(served, head + raw, path, headers={"Inference-Header-Content-Length": str(len(head))})
        assert (response.status_code, response.json()) == (422, {"error": message})
    fine = post(served, tensor([v for row in rows(2) for v in row], "FP64", [2, 4]), path)
    assert fine.status_code == 200 and fine.json()["outputs"][0]["data"] == [1, 2]


def test_v2_metadata_and_tritonclient_name_the_classes(served: Running) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url=served.url.removeprefix("http://"))
    metadata = client.get_model_metadata(MODEL)
    assert metadata["parameters"] == {"classes": list(CLASSES), "features": list(FEATURES)}
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]},
                                   {"name": "predictions", "datatype": "INT64", "shape": [-1]},
                                   {"name": "labels", "datatype": "BYTES", "shape": [-1]}]
    x = np.asarray(rows(6), dtype=np.float32)
    expected = ["barolo", "grignolino", "barbera"] * 2
    for binary in (True, False):
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        result = client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("labels", binary_data=binary),
                                                        triton.InferRequestedOutput("predictions",
                                                                                    binary_data=binary)])
        labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("labels").tolist()]
        assert labels == expected, binary
        assert result.as_numpy("predictions").tolist() == [CLASSES.index(label) for label in expected]
        everything = client.infer(MODEL, [tensor])   # no outputs named: all of them, labels included
        assert {o["name"] for o in everything.get_response()["outputs"]} == {"logits", "predictions", "labels"}
    # a request that names only logits gets only logits
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=False)
    only = client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("logits", binary_data=False)])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["logits"]
    with pytest.raises(InferenceServerException, match='unknown output "probabilities"'):
        client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("probabilities")])


def test_a_version_without_class_names_answers_as_before(served: Running) -> None:
    """Versions logged before mlgate kept their contract: no labels anywhere, no labels output."""
    current = served.server.current
    served.server.current = dataclasses.replace(current, loaded=dataclasses.replace(current.loaded, classes=(),
                                                                                    features=None))
    try:
        answer = post(served, {"inputs": rows(2)}).json()
        assert "labels" not in answer and len(answer["probabilities"]) == 2
        records_refused = post(served, {"inputs": records(1)})
        assert records_refused.status_code == 422 and "names no features" in records_refused.json()["error"]
        metadata = httpx.get(f"{served.url}/v2/models/{MODEL}", timeout=10).json()
        assert "parameters" not in metadata and [o["name"] for o in metadata["outputs"]] == ["logits", "predictions"]
        body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": rows(1)[0]}]}
        v2 = post(served, body, f"/v2/models/{MODEL}/infer").json()
        assert [o["name"] for o in v2["outputs"]] == ["logits", "predictions"]
        asked = post(served, body | {"outputs": [{"name": "labels"}]}, f"/v2/models/{MODEL}/infer")
        assert asked.status_code == 400 and asked.json() == {
            "error": 'unknown output "labels": this model has "logits" and "predictions"'}
    finally:
        served.server.current = current


def test_the_inference_log_names_its_columns_by_feature_and_class(served: Running) -> None:
    import pandas as pd

    # rows of a version without names first: they keep x0, x1, … and go to a file of their own
    current = served.server.current
    served.server.current = dataclasses.replace(current, loaded=dataclasses.replace(current.loaded, classes=(),
                                                                                    features=None))
    try:
        assert post(served, {"inputs": rows(2)}).status_code == 200
    finally:
        served.server.current = current
    assert post(served, {"inputs": records(3)}).status_code == 200
    assert post(served, {"inputs": rows(3)}).status_code == 200
    served.log.flush()
    unnamed, named = (pd.read_parquet(f) for f in served.log.files()[-2:])
    assert list(unnamed.columns) == ["x0", "x1", "x2", "x3", "prediction", "version", "timestamp"]
    assert list(named.columns) == [*FEATURES, "prediction", "label", "version", "timestamp"]
    newest = named.tail(6)
    assert newest["label"].tolist() == ["barolo", "grignolino", "barbera"] * 2
    assert newest["proline"].tolist() == [800.0] * 6 and newest["alcohol"].tolist()[:3] == [16.0, 13.0, 13.0]


# --- a small image version: broken image files -----------------------------------------------------------------

IMAGE_MODEL = '''"""Bright top or bright bottom: 8x8 uint8 images, two classes."""
import numpy as np
from torch import nn

preprocess = "pixels"


def load_data(rows: int = 300):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, rows)
    x = rng.integers(0, 100, size=(rows, 8, 8))
    x[y == 0, :4] += 150
    x[y == 1, 4:] += 150
    return x.astype(np.uint8), y


def build(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
'''


@pytest.fixture(scope="module")
def image_served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """serve-model on a registered, promoted 8x8 image version (ONNX only)."""
    directory = tmp_path_factory.mktemp("serving_images")
    (directory / "tiles_model.py").write_text(IMAGE_MODEL)
    config = fast_config(epochs=2)
    config["defaults"]["optimize"] = {"variants": ["onnx_fp32"]}
    config["defaults"]["benchmark"] = {"batch_sizes": [1], "warmup": 2, "iterations": 20, "rounds": 3}
    config["models"] = {"tiles": {"module": "tiles_model", "gates": {"absolute": {"min_accuracy": 0.0}}}}
    path = write_config(directory, config)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(directory))
        assert main(["--config", str(path), "run", "--model", "tiles"], standalone=False) == 0
        sys.modules.pop("tiles_model", None)
    running = Running(path, tmp_path_factory.mktemp("image-inference"), model="tiles")
    yield running
    running.stop()


def short_idat_png(pixels: np.ndarray, cut: int = 10) -> bytes:
    """A PNG whose IDAT chunk says it is `cut` bytes shorter than its data: PIL opens it, then reads the rest of
    the data as the next chunk when it decodes."""
    import io
    import struct

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    data = buffer.getvalue()
    at = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[at:at + 4])
    return data[:at] + struct.pack(">I", length - cut) + data[at + 4:]


def test_a_png_with_a_short_idat_gets_one_line_4xx_on_predict_and_v2(image_served: Running) -> None:
    """Finding 12(a): PIL reads past a short IDAT at decode time and raises SyntaxError, which was a 500."""
    import base64
    import json

    pixels = np.random.default_rng(1).integers(0, 256, size=(8, 8), dtype=np.uint8)
    broken = short_idat_png(pixels)
    v2 = image_served.url + "/v2/models/tiles/infer"
    predict = post(image_served, {"inputs": [{"b64": base64.b64encode(broken).decode()}]})
    # /v2 takes files in the binary extension: the JSON header, then each element's 4-byte length and bytes
    element = len(broken).to_bytes(4, "little") + broken
    header = json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(element)}}]}).encode()
    binary_v2 = httpx.post(v2, content=header + element, timeout=10,
                           headers={"Inference-Header-Content-Length": str(len(header))})
    for name, response in (("/predict", predict), ("/v2", binary_v2)):
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
        error = response.json()["error"]
        assert "not a readable PNG or JPEG file" in error and "\n" not in error, (name, error)
    # the same picture, whole, is served: the refusal is the file's, not the route's
    whole = short_idat_png(pixels, cut=0)
    assert post(image_served, {"inputs": [{"b64": base64.b64encode(whole).decode()}]}).status_code == 200


def test_a_large_uint8_json_tensor_reads_as_its_binary_form_and_bad_values_are_named(image_served: Running) -> None:
    """64 images as JSON (over 16 KB: parsed by the inference thread that then runs them; whole numbers 0-255 read
    by `bytearray()`) get the answer the binary tensor gets; a value UINT8 cannot hold is named as before. A binary
    tensor of a wider integer type is still checked value by value (only a cast that cannot lose skips the scan)."""
    import json

    v2 = image_served.url + "/v2/models/tiles/infer"
    pixels = np.random.default_rng(2).integers(0, 256, size=(64, 8, 8), dtype=np.uint8)

    def as_json(data: list[Any]) -> bytes:
        return json.dumps({"inputs": [{"name": "input", "shape": [64, 8, 8], "datatype": "UINT8", "data": data}],
                           "outputs": [{"name": "logits"}, {"name": "predictions"}]}).encode()

    flat = pixels.reshape(-1).tolist()
    body = as_json(flat)
    assert len(body) > 16 * 1024
    from_json = httpx.post(v2, content=body, timeout=10)
    head = json.dumps({"inputs": [{"name": "input", "shape": [64, 8, 8], "datatype": "UINT8",
                                   "parameters": {"binary_data_size": pixels.size}}],
                       "outputs": [{"name": "logits"}, {"name": "predictions"}]}).encode()
    from_binary = httpx.post(v2, content=head + pixels.tobytes(), timeout=10,
                             headers={"Inference-Header-Content-Length": str(len(head))})
    assert from_json.status_code == from_binary.status_code == 200, from_json.text[:300]
    outputs = [{o["name"]: o["data"] for o in r.json()["outputs"]} for r in (from_json, from_binary)]
    assert outputs[0] == outputs[1]
    cases = {256: "element 100 of the input: value 256 is out of range for UINT8",
             -1: "element 100 of the input: value -1 is out of range for UINT8",
             2.5: "element 100 of the input: value 2.5 is not a whole number, as UINT8 needs",
             True: "element 100 of the input is a boolean (true): send numbers"}
    for value, message in cases.items():
        response = httpx.post(v2, content=as_json(flat[:100] + [value] + flat[101:]), timeout=10)
        assert (response.status_code, response.json()) == (422, {"error": message}), value
    huge = httpx.post(v2, content=as_json(flat[:100] + [10**30] + flat[101:]), timeout=10)
    assert (huge.status_code, huge.json()) == (
        422, {"error": "element 100 of the input: value 1e+30 is out of range for UINT8"})   # past int64: a float
    for whole_number in (7.0, 1e2):   # whole numbers written as floats are taken, as before
        whole = httpx.post(v2, content=as_json(flat[:100] + [whole_number] + flat[101:]), timeout=10)
        assert whole.status_code == 200 and whole.json()["outputs"][1]["data"][:12] == outputs[0]["predictions"][:12]

    def as_int16(values: np.ndarray) -> httpx.Response:
        head16 = json.dumps({"inputs": [{"name": "input", "shape": [64, 8, 8], "datatype": "INT16",
                                         "parameters": {"binary_data_size": values.size * 2}}],
                             "outputs": [{"name": "predictions"}]}).encode()
        return httpx.post(v2, content=head16 + values.astype("<i2").tobytes(), timeout=10,
                          headers={"Inference-Header-Content-Length": str(len(head16))})

    assert as_int16(pixels).json()["outputs"][0]["data"] == outputs[0]["predictions"]
    wide = pixels.astype(np.int16).reshape(-1)
    wide[100] = 300
    refused = as_int16(wide)
    assert (refused.status_code, refused.json()) == (
        422, {"error": "element 100 of the input: value 300 is out of range for uint8"})


def test_a_hostile_binary_header_length_gets_one_line_400(image_served: Running) -> None:
    """Inference-Header-Content-Length of thousands of digits (Python refuses to convert past 4,300), unicode
    digits, a sign, or past the body: one line, 400, never a 500."""
    v2 = image_served.url + "/v2/models/tiles/infer"
    body = b'{"inputs": []}' + bytes(20_000)   # over 16 KB: the parse-on-the-loop rule reads the header first
    for header, message in (("9" * 5000, "Inference-Header-Content-Length is not a number"),
                            ("\u0661\u0662", "Inference-Header-Content-Length is not a number"),
                            ("-14", "Inference-Header-Content-Length -14 is outside the body (20014 bytes)"),
                            ("99999999999", "Inference-Header-Content-Length 99999999999 is outside the body "
                                            "(20014 bytes)")):
        response = httpx.post(v2, content=body, timeout=10,
                              headers=[(b"Inference-Header-Content-Length", header.encode())])
        assert (response.status_code, response.json()) == (400, {"error": message}), header[:20]
