"""Text drift that sees what a lower-casing tokenizer and a mean-pooling network cannot: the case of the letters,
characters the tokenizer never saw, and word order. The descriptors one by one, then `mlgate monitor` on a tiny
text model (an EmbeddingBag: order-blind, as mean pooling is) with a reference written by the job's own
`_write_reference`, and with a reference in the older format (no new descriptors, no bigrams)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from automation.preprocess import TextEncoder, Tokenize, _words, bigram_hashes
from tests.conftest import fast_config, last_json, run_cli, write_config
from triggers.drift import monitor
from triggers.drift.monitor import read_reference

SUBJECTS = ["Arsenal", "the bank", "the minister", "Chelsea", "the party", "the company", "Leeds", "the union"]
VERBS = ["beat", "raised", "announced", "lost to", "cut", "won", "rejected", "backed"]
OBJECTS = ["the league", "interest rates", "a new policy", "the cup final", "its profits", "the vote", "the deal"]
TAILS = ["on Monday", "last week", "after a long debate", "in the second half", "despite the market", "at home"]


def articles(count: int, seed: int) -> list[str]:
    """Sentences from fixed phrases: their word pairs repeat from article to article, as a language's do."""
    rng = np.random.default_rng(seed)
    return [" ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}."
                     for _ in range(int(rng.integers(2, 7)))) for _ in range(count)]


def shuffled(texts: list[str], seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.permutation(t.split())) for t in texts]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return Tokenize(vocab_size=200, max_length=64).fit(articles(300, seed=0))


# --- the descriptors ------------------------------------------------------------------------------------------

def test_uppercase_share_counts_letters_only(encoder: TextEncoder) -> None:
    found = encoder.descriptors(["ABC def", "", "123 !?", "Ünï", "GOAL"])["uppercase_share"]
    assert found.tolist() == pytest.approx([0.5, 0.0, 0.0, 1 / 3, 1.0])


def test_unknown_token_share_counts_unk_tokens_not_case(encoder: TextEncoder) -> None:
    assert "arsenal" in encoder.tokenizer.get_vocab()          # one whole token
    found = encoder.descriptors(["Arsenal won", "ARSENAL WON", "Arsenal ☃", "☃ ☃", ""])["unknown_token_share"]
    assert found.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 0.0])


def test_known_bigram_share_falls_for_shuffled_words_and_is_one_for_the_texts_that_made_it(
        encoder: TextEncoder) -> None:
    training = articles(300, seed=0)
    bigrams = encoder.bigram_set(training)
    assert bigrams.dtype == np.uint32 and np.all(np.diff(bigrams.astype(np.int64)) > 0)   # sorted, unique
    assert np.array_equal(bigrams, encoder.bigram_set(training))
    assert bigram_hashes(["the", "league"]).tolist() == [420001642]   # BLAKE2b: the same in every process
    own = encoder.descriptors(training[:50], bigrams)["known_bigram_share"]
    fresh = encoder.descriptors(articles(50, seed=1), bigrams)["known_bigram_share"]
    mixed = encoder.descriptors(shuffled(articles(50, seed=1)), bigrams)["known_bigram_share"]
    assert (own == 1.0).all()
    assert fresh.mean() > 0.95 and mixed.mean() < 0.6, (fresh.mean(), mixed.mean())
    assert encoder.descriptors(["Arsenal", ""], bigrams)["known_bigram_share"].tolist() == [1.0, 1.0]
    assert "known_bigram_share" not in encoder.descriptors(training[:2])   # no pairs to compare with


# --- the monitor on a tiny text model -------------------------------------------------------------------------

REFERENCE_ROWS, WINDOW_ROWS = 300, 150


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory, encoder: TextEncoder) -> tuple[Any, str]:
    """An order-blind text classifier saved as the job logs a version's torch model, its tokenizer inside."""
    import mlflow.pytorch
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(encoder.vocab_size, 8, mode="mean"), nn.Linear(8, 3)).eval()
    directory = tmp_path_factory.mktemp("text-model") / "torch"
    mlflow.pytorch.save_model(model, str(directory), serialization_format="pickle", pip_requirements=["torch"])
    encoder.save(directory / "extra")
    return model, str(directory)


def write_reference(path: Path, encoder: TextEncoder, model: Any, torch_uri: str, old: bool = False,
                    rows: int = REFERENCE_ROWS) -> Path:
    """The job's own `_write_reference`; `old`: as versions logged before the case and order descriptors."""
    from automation.data import Splits
    from automation.job import _write_reference

    train, unseen = np.array(articles(300, seed=0), dtype=object), np.array(articles(rows, seed=2),
                                                                              dtype=object)
    labels = np.zeros(len(unseen) // 2, dtype=np.int64)
    raw = Splits(train, np.zeros(len(train), np.int64), unseen[:len(labels)], labels, unseen[len(labels):], labels,
                 ("a", "b", "c"))
    _write_reference(path, SimpleNamespace(raw=raw, kind="text", encoder=encoder), model, torch_uri)
    if old:
        with np.load(path, allow_pickle=False) as data:
            kept = {k: data[k] for k in data.files if k in ("embeddings", "input_kind", "input_shape", "torch_uri",
                                                            "descriptor_text_length", "descriptor_oov_share")}
        np.savez_compressed(path, **kept)
    return path


def config_with(tmp_path: Path, reference: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(monitor, "load_reference", lambda config, model: read_reference(reference, "4"))
    config = fast_config()
    config["models"]["digits_mlp"]["drift"] = {"min_window_rows": 100}   # threshold 0.3, the default
    return write_config(tmp_path, config)


def window_tests(reference: Any, texts: list[str], scratch: Path) -> list[dict[str, Any]]:
    """Every test `mlgate monitor` runs on this window, without Evidently's t-SNE picture (seconds each)."""
    from triggers.drift.embeddings import drift_tests, embed_window

    embeddings, descriptors = embed_window(reference, np.array(texts, dtype=object), scratch / "model")
    return drift_tests(reference, embeddings, descriptors, picture=False)[1]


def test_uppercase_and_shuffled_windows_move_their_descriptor_and_reach_the_threshold(
        text_model: tuple[Any, str], encoder: TextEncoder, tmp_path: Path) -> None:
    from triggers.drift.embeddings import signal_share

    path = write_reference(tmp_path / "train.npz", encoder, *text_model)
    with np.load(path, allow_pickle=False) as data:                     # no object arrays in the reference
        assert {"descriptor_uppercase_share", "descriptor_unknown_token_share", "descriptor_known_bigram_share",
                "bigram_hashes"} <= set(data.files)
        assert all(data[k].dtype != object for k in data.files)
    reference = read_reference(path, "4")
    window = articles(WINDOW_ROWS, seed=3)
    unshifted = window_tests(reference, window, tmp_path)
    assert len(unshifted) == 6 and not any(t["drifted"] for t in unshifted), unshifted
    for texts, descriptor in (([t.upper() for t in window], "uppercase_share"),
                              (shuffled(window), "known_bigram_share")):
        tests = window_tests(reference, texts, tmp_path)
        assert [t["column"] for t in tests if t["drifted"]] == [descriptor], tests   # the network saw nothing
        assert signal_share(tests) == 0.5                  # one of two signals: past the default threshold, 0.3


def test_monitor_json_lists_the_drifted_descriptor_with_score_and_threshold(
        text_model: tuple[Any, str], encoder: TextEncoder, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # fewer rows than the other tests: Evidently's t-SNE picture of them is most of this test's time
    reference = write_reference(tmp_path / "train.npz", encoder, *text_model, rows=160)
    config = config_with(tmp_path, reference, monkeypatch)
    window = tmp_path / "window.parquet"
    pd.DataFrame({"text": [t.upper() for t in articles(100, seed=3)]}).to_parquet(window)
    code, out, err = run_cli(capsys, "--config", str(config), "monitor", "--model", "digits_mlp", "--current",
                             str(window), "--dry-run", "--json")
    assert code == 0, err
    summary = last_json(out)
    assert summary["retrain"] and summary["drift_share"] == 0.5 and summary["total_columns"] == 6
    assert summary["compared"] == "embeddings and text descriptors"
    [moved] = summary["drifted"]
    assert moved["column"] == "uppercase_share" and moved["method"].endswith("p_value")
    assert moved["score"] < moved["threshold"] == 1e-4
    kept = json.loads(Path(summary["report"]).with_suffix(".json").read_text(encoding="utf-8"))
    assert kept["event"]["data"]["drifted_columns"] == summary["drifted"]   # what an alert on the event reads


def test_a_reference_without_the_new_descriptors_still_monitors(
        text_model: tuple[Any, str], encoder: TextEncoder, tmp_path: Path) -> None:
    reference = read_reference(write_reference(tmp_path / "old.npz", encoder, *text_model, old=True), "4")
    assert reference.bigrams is None and sorted(reference.descriptors) == ["oov_share", "text_length"]
    window = articles(WINDOW_ROWS, seed=3)
    unshifted = window_tests(reference, window, tmp_path)           # the new descriptors are computed, not tested
    assert [t["column"] for t in unshifted] == ["embeddings", "oov_share", "text_length"]
    assert not any(t["drifted"] for t in unshifted), unshifted
    longer = window_tests(reference, [t + " " + t for t in window], tmp_path)
    assert "text_length" in [t["column"] for t in longer if t["drifted"]]


def test_a_descriptor_of_few_values_is_compared_as_a_number_not_as_categories() -> None:
    """[UNK] shares are almost all 0: one text with a share the reference never had is no drift (as categories it
    was p = 0), a window of unknown characters is."""
    from triggers.drift.embeddings import EmbeddingReference, drift_tests

    rng = np.random.default_rng(0)
    known = np.where(np.arange(300) % 100 == 0, 0.002, 0.0)                   # 3 texts of 300 with one [UNK]
    reference = EmbeddingReference(rng.normal(size=(300, 4)), {"unknown_token_share": known}, "text", (), "", "1")
    one_odd = np.where(np.arange(100) == 7, 0.004, 0.0)
    emoji = np.full(100, 0.3)
    for window, drifted in ((one_odd, False), (emoji, True)):
        tests = drift_tests(reference, rng.normal(size=(100, 4)), {"unknown_token_share": window}, picture=False)[1]
        [descriptor] = [t for t in tests if t["column"] == "unknown_token_share"]
        assert descriptor["drifted"] is drifted and descriptor["method"] == "K-S p_value", descriptor


def test_words_are_the_tokens_with_a_letter_or_digit_anywhere_in_them_whatever_the_script() -> None:
    """`_words` tries str.isalnum first (fast) and looks at each character only for the rest: the words are those
    with any letter or digit, as before, for currency, dashes, accents, other scripts, numerals and empty tokens."""
    tokens = ["café", "£5", "£", "—", "", "٣", "ⅷ", "naïve-ish", "__", "x_", "東京", "!", "1.5", "🙂", "a🙂"]
    assert _words(tokens) == [t for t in tokens if any(c.isalnum() for c in t)]
    assert _words(tokens) == ["café", "£5", "٣", "ⅷ", "naïve-ish", "x_", "東京", "1.5", "a🙂"]
