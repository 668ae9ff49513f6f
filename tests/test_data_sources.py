"""A user's own images and texts named in yaml (automation/data_sources.py), `mlgate check` (automation/check.py)
and the serving round trip in the contract (automation/serving_check.py): a folder of colour pictures of mixed
sizes and a folder of texts each go from a yaml block, with a model file that holds only build(), to a served
model that answers a PNG file or a text with a class name; a loader returning a layout serving cannot feed is
refused in one line, by `check` and by `run`, before any training."""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from automation.config import SplitConfig, load_config
from tests.conftest import error_lines, fast_config, last_json, run_cli, write_config
from triggers.cli import main

COLOURS = {"apple": (200, 30, 30), "leaf": (30, 170, 40), "sky": (40, 80, 220)}
WORDS = {"billing": "invoice refund charge payment card receipt",
         "outage": "down error timeout server crash unreachable",
         "login": "password reset account locked signin token"}

# the user's own networks, not the examples': build() only, no loader
USER_CNN = '''
from torch import nn

def build(input_shape, num_classes, width: int = 8):
    return nn.Sequential(nn.Conv2d(input_shape[0], width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, num_classes))
'''
USER_BAG = '''
from torch import nn

preprocess = {"tokenize": {"vocab_size": 200, "max_length": 32, "min_frequency": 1}}

class Bag(nn.Module):
    def __init__(self, vocab_size, num_classes, dim):
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab_size, dim, mode="mean")
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids):
        return self.head(self.embedding(ids))

def build(vocab_size, num_classes, dim: int = 16):
    return Bag(vocab_size, num_classes, dim)
'''
BAD_LAYOUT = '''
import numpy as np
from torch import nn

preprocess = "pixels"

def load_data(channels: int = 3):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(60, 16, 16, channels), dtype=np.uint8), np.repeat([0, 1], 30)

def build(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))
'''


def problems(stderr: str) -> list[str]:
    """What a person reads, less the hint that may follow the one line naming the problem."""
    return [line for line in error_lines(stderr) if not line.startswith("Hint:")]


def picture_folder(root: Path, per_class: int = 24) -> Path:
    """Colour pictures of mixed sizes, as PNG and JPEG, one folder per class, plus a file that is no image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            height, width = int(rng.integers(20, 70)), int(rng.integers(20, 70))
            pixels = np.clip(rng.normal(colour, 35, size=(height, width, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "README.md").write_text("the pictures, by class")
    (root / "apple" / "notes.txt").write_text("not a picture")
    return root


def text_folder(root: Path, per_class: int = 24) -> Path:
    rng = np.random.default_rng(1)
    for name, words in WORDS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            text = " ".join(rng.choice(words.split() + ["the", "a", "please", "help"], size=12))
            (root / name / f"{i}.txt").write_text(text)
    return root


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A user's project: their model files, their data folders and mlgate.yaml naming both."""
    (tmp_path / "my_cnn.py").write_text(USER_CNN)
    (tmp_path / "my_bag.py").write_text(USER_BAG)
    (tmp_path / "bad_layout.py").write_text(BAD_LAYOUT)
    picture_folder(tmp_path / "data" / "pictures")
    text_folder(tmp_path / "data" / "tickets")
    config = fast_config(epochs=4, lean=True)
    config["defaults"]["gates"] = {"absolute": {"min_accuracy": 0.6, "max_p95_latency_ms": 500}}
    config["models"] = {
        "pictures": {"module": "my_cnn", "source": {"images": "data/pictures", "size": [24, 32]},
                     "train": {"lr": 0.02}},
        "tickets": {"module": "my_bag", "source": {"texts": "data/tickets"}, "train": {"lr": 0.05}},
        "two_bands": {"module": "bad_layout", "data": {"channels": 2}},
        "rgb_last": {"module": "bad_layout"},
    }
    write_config(tmp_path, config)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MLGATE_DATA_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "mlgate.yaml"
    for name in ("my_cnn", "my_bag", "bad_layout"):
        sys.modules.pop(name, None)


def test_an_image_folder_becomes_colour_pixels_the_size_asked_with_training_on_disk(project: Path) -> None:
    from automation.data import DiskArray
    from automation.data_sources import load_source

    config = load_config(project)
    splits = load_source("pictures", config.model("pictures").source, config.root, SplitConfig())
    assert isinstance(splits.x_train, DiskArray)                       # streamed: training rows stay on disk
    assert splits.x_val.dtype == np.uint8 and splits.x_val.shape[1:] == (3, 24, 32)
    assert splits.classes == ("apple", "leaf", "sky")                  # folder names, sorted
    assert len(splits.sources) == 72                                   # the README and notes.txt left out
    red = splits.x_test[splits.y_test == 0].reshape(-1, 3, 24 * 32).mean(axis=(0, 2))
    assert red[0] > 150 and red[1] < 80                                 # RGB order kept through the resize
    again = load_source("pictures", config.model("pictures").source, config.root, SplitConfig())
    assert np.array_equal(again.x_test, splits.x_test)                 # seeded split; the decoded cache reused


def test_a_folder_of_pictures_and_one_of_texts_go_from_yaml_to_a_served_model(project: Path,
                                                                              capsys: pytest.CaptureFixture[str],
                                                                              tmp_path: Path) -> None:
    from tests.test_serving import Running

    for model in ("pictures", "tickets"):
        code, out, err = run_cli(capsys, "--config", str(project), "check", model)
        assert code == 0 and "the contract holds" in out, err
        code, out, err = run_cli(capsys, "--config", str(project), "run", "--model", model, "--json")
        summary = last_json(out)
        assert code == 0 and summary["promoted"], err
        served = [c for c in summary["gate"]["checks"] if c["name"] == "served artifact"]
        assert served and served[0]["status"] == "passed"
        assert summary["cost"]["outside_training_seconds"] > 0
    from automation.serving_check import png_bytes

    pictures = Running(project, tmp_path / "log-pictures", model="pictures")
    try:
        sky = np.broadcast_to(np.array(COLOURS["sky"], dtype=np.uint8)[:, None, None], (3, 24, 32))
        answer = httpx.post(pictures.url + "/predict",
                            json={"inputs": [{"b64": base64.b64encode(png_bytes(sky)).decode()}]}, timeout=30)
        assert answer.status_code == 200 and answer.json()["labels"] == ["sky"], answer.text
    finally:
        pictures.stop()
    tickets = Running(project, tmp_path / "log-tickets", model="tickets")
    try:
        answer = httpx.post(tickets.url + "/predict", json={"inputs": ["please reset my password, account locked"]},
                            timeout=30)
        assert answer.status_code == 200 and answer.json()["labels"] == ["login"], answer.text
    finally:
        tickets.stop()


def test_a_layout_serving_cannot_feed_is_refused_in_one_line_before_training(project: Path,
                                                                             capsys: pytest.CaptureFixture[str]
                                                                             ) -> None:
    code, out, err = run_cli(capsys, "--config", str(project), "check", "two_bands")
    lines = problems(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "models.two_bands: load_data() returned uint8 examples shaped [16, 16, 2]" in lines[0]
    assert "cannot take as a PNG file" in lines[0]
    code, out, err = run_cli(capsys, "--config", str(project), "run", "--model", "two_bands")
    assert code == 2 and "cannot take as a PNG file" in err and "stage started\", \"stage\": \"train" not in err
    assert not (project.parent / ".mlgate" / "reports").exists() or not any(
        (project.parent / ".mlgate" / "reports").iterdir())


def test_channels_last_images_are_converted_once_to_what_serving_decodes(project: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from automation import contract

    x = np.random.default_rng(0).integers(0, 255, size=(30, 16, 12, 3), dtype=np.uint8)
    splits = contract.prepare_data("m", type("M", (), {"preprocess": "pixels"})(), (x, np.repeat([0, 1, 2], 10)),
                                   SplitConfig())
    assert splits.input_shape == (3, 16, 12)
    original = {row.tobytes() for row in np.moveaxis(x, -1, 1)}
    assert all(row.tobytes() in original for row in splits.x_test)
    code, out, err = run_cli(capsys, "--config", str(project), "check", "rgb_last")
    assert code == 0 and "the contract holds" in out, err


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "leaf" / "link.png").symlink_to("/etc/passwd"), "leaf/link.png is a symbolic link"),
    (lambda root: (root / "sky" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really"),
     "sky/broken.png is not a readable image file"),
    (lambda root: [p.unlink() for p in sorted((root / "leaf").iterdir())[2:]], "class 'leaf' has 2 file(s)"),
    (lambda root: os.symlink("/tmp", root / "elsewhere"), "elsewhere is a symbolic link"),
])
def test_a_broken_picture_folder_is_named_in_one_line(project: Path, capsys: pytest.CaptureFixture[str],
                                                      damage: Any, message: str) -> None:
    damage(project.parent / "data" / "pictures")
    code, out, err = run_cli(capsys, "--config", str(project), "check", "pictures")
    assert code == 2 and len(problems(err)) == 1 and message in err, err


def test_a_csv_with_a_text_column_and_bad_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd

    from automation import contract
    from automation.data_sources import load_source
    from automation.preprocess import ContractError

    rows = [{"body": f"{w} {w} please", "team": team} for team, words in WORDS.items() for w in words.split()]
    pd.DataFrame(rows).to_csv(tmp_path / "tickets.csv", index=False)
    config = fast_config()
    config["models"] = {"csv": {"module": "models.news_transformer",
                                "source": {"csv": "tickets.csv", "text": "body", "label": "team"}}}
    loaded = load_config(write_config(tmp_path, config))
    source = loaded.model("csv").source
    x, y = load_source("csv", source, loaded.root, SplitConfig())
    splits = contract.prepare_data("csv", type("M", (), {"preprocess": {"tokenize": {}}})(), (x, y), SplitConfig())
    assert splits.classes == ("billing", "login", "outage") and isinstance(splits.x_train[0], str)
    with pytest.raises(ContractError, match="tickets.csv has no 'subject' column"):
        load_source("csv", source.model_copy(update={"text": "subject"}), loaded.root, SplitConfig())
    for bad, expected in (({"images": "a", "texts": "b"}, "exactly one of images, texts or csv (got images, texts)"),
                          ({}, "exactly one of images, texts or csv"),
                          ({"images": "a", "size": [0, 5]}, "size"),
                          # 100,000² pixels each would fill the disk a picture at a time
                          ({"images": "a", "size": [100_000, 100_000]}, "less than or equal to 2048"),
                          ({"images": "a", "size": ["big", 5]}, "size")):
        config["models"]["csv"]["source"] = bad
        write_config(tmp_path, config)
        code, out, err = run_cli(capsys, "--config", str(tmp_path / "mlgate.yaml"), "check", "csv")
        assert code == 2 and expected in err and len(problems(err)) == 1, err


def test_a_missing_data_file_names_the_model_and_its_loader(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    (tmp_path / "reads_csv.py").write_text("import pandas as pd\nfrom torch import nn\n"
                                           "def load_data(path):\n    return pd.read_csv(path)\n"
                                           "def build(input_shape, num_classes):\n"
                                           "    return nn.Linear(input_shape[0], num_classes)\n")
    config = fast_config()
    config["models"] = {"wine": {"module": "reads_csv", "data": {"path": "data/wine.csv"}}}
    write_config(tmp_path, config)
    sys.path.insert(0, str(tmp_path))
    try:
        code, out, err = run_cli(capsys, "--config", str(tmp_path / "mlgate.yaml"), "check", "wine")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("reads_csv", None)
    assert code == 2 and "Traceback" not in err
    assert "models.wine: load_data(**{'path': 'data/wine.csv'}): no such file: data/wine.csv" in problems(err)[0]


def test_nan_in_a_request_body_says_how_json_writes_a_missing_value() -> None:
    from automation.wire import v2_tensors
    from automation.wire.json_inputs import BadInput
    from automation.wire.predict import parse_predict

    with pytest.raises(BadInput, match="NaN and Infinity are not JSON values .* written null") as caught:
        parse_predict(json.dumps({"inputs": [[1.0, float("nan")]]}).encode(), "tensor", (2,), "float32", 8)
    assert caught.value.status == 400
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2],
                                   "data": [1.0, float("inf")]}]}).encode()
    with pytest.raises(BadInput, match="the inference request is not valid JSON: NaN and Infinity"):
        v2_tensors.parse_infer(body, None, (2,), "float32", 8)
    with pytest.raises(BadInput, match=r"^the body is not valid JSON$"):
        parse_predict(b'{"inputs": [[1, 2]', "tensor", (2,), "float32", 8)


def test_fresh_data_comes_in_the_same_forms_as_the_source(project: Path, tmp_path: Path) -> None:
    """`--extra-train` (and a drift event's data) for a sourced model: pictures of any size resized as the
    training ones were; texts as a folder or a CSV with the text column."""
    import pandas as pd

    from automation import contract
    from automation.data_sources import load_source, text_folder as read_text_folder

    config = load_config(project)
    pictures = load_source("pictures", config.model("pictures").source, config.root, SplitConfig())
    fresh = picture_folder(tmp_path / "fresh-pictures", per_class=3)
    for stray in (fresh / "README.md", fresh / "apple" / "notes.txt"):   # fresh folders hold pictures only
        stray.unlink()
    grown = contract.append_fresh(pictures, fresh, kind="image", resize="RGB")
    assert len(grown.y_train) == len(pictures.y_train) + 9 and grown.x_train[-1].shape == (3, 24, 32)
    with pytest.raises(contract.ContractError, match="the model takes 32×24"):   # unsourced: never resized
        contract.read_fresh(fresh, pictures, kind="image")
    x, y = read_text_folder("t", project.parent / "data" / "tickets")
    texts = contract.Splits(x, np.zeros(len(x), np.int64), x, np.zeros(len(x), np.int64), x,
                            np.zeros(len(x), np.int64), tuple(WORDS))
    folder_x, folder_y = contract.read_fresh(text_folder(tmp_path / "fresh-texts", per_class=2), texts, kind="text")
    assert len(folder_x) == 6 and set(folder_y.tolist()) == {0, 1, 2}
    pd.DataFrame({"body": ["refund my card", "server is down"], "team": ["billing", "outage"]}).to_csv(
        tmp_path / "fresh.csv", index=False)
    csv_x, csv_y = contract.read_fresh(tmp_path / "fresh.csv", texts, label="team", kind="text", text="body")
    assert csv_x.tolist() == ["refund my card", "server is down"] and csv_y.tolist() == [0, 1]   # by name, in the model's class order
