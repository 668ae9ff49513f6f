"""Pre-processing that travels with the model: fitted on the training split only, then saved, exported and
served with every registered version, so clients send raw inputs.

A model file names its step (`preprocess = ...`):
    "standardize" | "minmax"          tabular features, per feature
    "normalize_channels"              float images, per channel
    "pixels"                          uint8 images (N, H, W) or (N, C, H, W): /255, then per-channel
                                      standardization; clients send the uint8 pixels (or PNG files)
    "tokenize" or {"tokenize": {"vocab_size": 8000, "max_length": 256}}
                                      text: a WordPiece tokenizer (Hugging Face `tokenizers`) trained on the
                                      training texts; the network receives int64 token ids, clients send strings
    an object with fit(x_train) -> nn.Module   your own in-graph step (statistics in buffers)

In-graph steps (nn.Module) become the network's first layer: ONNX, int8 and compiled variants run them.
The tokenizer cannot live in a graph: it is a host-side step (`TextEncoder`), saved beside every logged model
as `tokenizer.json`, and serving, the benchmark's served path and the monitor all load that one file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from automation.errors import UsageError

TOKENIZER_FILE = "tokenizer.json"
PAD, UNK = "[PAD]", "[UNK]"
STAT_SAMPLE = 10_000   # images whose pixels fit the channel statistics: enough for 4 digits, bounded memory
BIGRAM_TEXTS = 5_000   # training texts whose word pairs a drift reference keeps: bounded size (4 bytes a pair)
ENCODE_CHUNK = 256     # texts tokenized at a time (TextEncoder.encode): memory bounded by the chunk, not the split


class ContractError(UsageError):
    """The model file's side of the contract is broken; the message names the model and the function."""


class Scale(nn.Module):
    """(x - shift) / scale with statistics fitted on the training split. They are buffers: saved in the state
    dict, exported into every graph (ONNX, AOTInductor), never trained."""

    def __init__(self, shift: np.ndarray, scale: np.ndarray, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.register_buffer("shift", torch.from_numpy(np.ascontiguousarray(shift, dtype=np.float32)))
        self.register_buffer("scale", torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale

    def extra_repr(self) -> str:
        return self.kind


class FittedScaling:
    """A built-in step: which axes its statistics reduce over, and which statistics."""

    def __init__(self, name: str, axes: Callable[[np.ndarray], tuple[int, ...]],
                 stats: Callable[[np.ndarray, tuple[int, ...]], tuple[np.ndarray, np.ndarray]]) -> None:
        self.name, self._axes, self._stats = name, axes, stats

    def fit(self, x_train: np.ndarray) -> nn.Module:
        shift, scale = self._stats(x_train.astype(np.float64), self._axes(x_train))
        scale = np.where(scale > 1e-12, scale, 1.0)        # a constant feature passes through, centred
        return Scale(shift, scale, self.name)


def _all_but_batch(x: np.ndarray) -> tuple[int, ...]:
    return (0,)


def _all_but_channels(x: np.ndarray) -> tuple[int, ...]:
    if x.ndim < 3:
        raise ContractError(f"normalize_channels needs examples shaped (channels, …); got {list(x.shape[1:])}")
    return (0, *range(2, x.ndim))


def _mean_std(x: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=axes, keepdims=True)[0], x.std(axis=axes, keepdims=True)[0]


def _min_range(x: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    low = x.min(axis=axes, keepdims=True)[0]
    return low, x.max(axis=axes, keepdims=True)[0] - low


PREPROCESSORS: dict[str, FittedScaling] = {
    "standardize": FittedScaling("standardize", _all_but_batch, _mean_std),                  # per feature
    "minmax": FittedScaling("minmax", _all_but_batch, _min_range),                            # per feature, to [0, 1]
    "normalize_channels": FittedScaling("normalize_channels", _all_but_channels, _mean_std),  # per image channel
}


# --- images: uint8 pixels in ----------------------------------------------------------------------------------

class PixelScale(nn.Module):
    """uint8 pixels → floats in [0, 1] → per-channel standardized; an (N, H, W) batch gains its channel.
    The cast follows the buffers' dtype, so a half-precision copy of the model stays half."""

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)))
        self.register_buffer("std", torch.from_numpy(np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return (x.to(self.mean.dtype) / 255.0 - self.mean) / self.std

    def extra_repr(self) -> str:
        return "pixels"


class Pixels:
    name = "pixels"
    input_dtype = np.dtype(np.uint8)

    def fit(self, x_train: Any) -> nn.Module:
        if np.dtype(x_train.dtype) != np.uint8 or x_train.ndim not in (3, 4):
            raise ContractError(f"pixels needs uint8 images shaped (N, H, W) or (N, C, H, W); got {x_train.dtype} "
                                f"shaped {list(x_train.shape)}")
        rows = np.random.default_rng(0).choice(len(x_train), min(len(x_train), STAT_SAMPLE), replace=False)
        sample = np.asarray(x_train[np.sort(rows)], dtype=np.float64) / 255.0
        if sample.ndim == 3:
            sample = sample[:, None]
        axes = (0, 2, 3)
        std = sample.std(axis=axes)
        return PixelScale(sample.mean(axis=axes), np.where(std > 1e-12, std, 1.0))


# --- text: strings in ---------------------------------------------------------------------------------------

class TextEncoder:
    """A fitted tokenizer: strings → int64 token ids, padded or cut to `max_length`. The same object (loaded
    from the same tokenizer.json) encodes for training, benchmark, serving and the monitor."""

    name = "tokenize"

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.token_to_id(PAD)
        self.unk_id = tokenizer.token_to_id(UNK)
        tokenizer.enable_padding(pad_id=self.pad_id, pad_token=PAD, length=max_length)
        tokenizer.enable_truncation(max_length)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids, (len(texts), max_length) int64, written ENCODE_CHUNK texts at a time: an Encoding holds
        each token's string, offsets and masks besides its id, and a whole split's of them at once (2,225
        articles: ~110 MB) left the process that much larger once freed."""
        ids = np.empty((len(texts), self.max_length), dtype=np.int64)
        for start in range(0, len(texts), ENCODE_CHUNK):
            encodings = self.tokenizer.encode_batch(list(texts[start:start + ENCODE_CHUNK]))
            ids[start:start + len(encodings)] = [e.ids for e in encodings]
        return ids

    def descriptors(self, texts: Sequence[str], bigrams: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Per text, what the network cannot see (it gets lower-cased ids, mean-pooled):
        - text_length: characters;
        - oov_share: words the vocabulary does not hold whole (WordPiece splits them into pieces or [UNK]);
        - uppercase_share: uppercase letters among letters (the normalizer lower-cases everything);
        - unknown_token_share: tokens that are [UNK] (characters the training texts never had);
        - known_bigram_share, with `bigrams` (`bigram_set` of the training texts): adjacent-word pairs the
          training texts also had; shuffled word order drops it. A text of one word has no pair out of place: 1."""
        vocab = self.tokenizer.get_vocab()
        lengths, oov, upper, unknown, known = [], [], [], [], []
        pieces: dict[str, tuple[int, int]] = {}   # token, [UNK] counts of a pre-token: words repeat a lot
        for text in texts:
            tokens = self._pre_tokens(text)
            words = _words(tokens)
            lengths.append(len(text))
            oov.append(sum(w not in vocab for w in words) / len(words) if words else 0.0)
            letters = sum(map(str.isalpha, text))
            upper.append(sum(map(str.isupper, text)) / letters if letters else 0.0)
            counts = [pieces[t] if t in pieces else pieces.setdefault(t, self._unknown_pieces(t)) for t in tokens]
            total = sum(c[0] for c in counts)
            unknown.append(sum(c[1] for c in counts) / total if total else 0.0)
            if bigrams is not None:
                known.append(_share_in(bigram_hashes(words), bigrams))
        found = {"text_length": lengths, "oov_share": oov, "uppercase_share": upper, "unknown_token_share": unknown}
        if bigrams is not None:
            found["known_bigram_share"] = known
        return {name: np.array(values, dtype=np.float64) for name, values in found.items()}

    def bigram_set(self, texts: Sequence[str]) -> np.ndarray:
        """The hashed adjacent-word pairs of up to BIGRAM_TEXTS texts (a seeded sample): sorted unique uint32, what
        a reference stores for `known_bigram_share` (4 bytes a pair, no strings)."""
        rows = range(len(texts))
        if len(texts) > BIGRAM_TEXTS:
            rows = np.sort(np.random.default_rng(0).choice(len(texts), BIGRAM_TEXTS, replace=False)).tolist()
        parts = [bigram_hashes(_words(self._pre_tokens(texts[i]))) for i in rows]
        return np.unique(np.concatenate([np.zeros(0, np.uint32), *parts]))

    def _pre_tokens(self, text: str) -> list[str]:
        """The tokenizer's words: normalized (lower-cased, accents stripped) and split at spaces and punctuation."""
        normalize = self.tokenizer.normalizer.normalize_str if self.tokenizer.normalizer else str
        return [w for w, _ in self.tokenizer.pre_tokenizer.pre_tokenize_str(normalize(text))]

    def _unknown_pieces(self, word: str) -> tuple[int, int]:
        ids = [token.id for token in self.tokenizer.model.tokenize(word)]
        return len(ids), sum(i == self.unk_id for i in ids)

    def save(self, directory: Path) -> Path:
        path = directory / TOKENIZER_FILE
        directory.mkdir(parents=True, exist_ok=True)
        state = json.loads(self.tokenizer.to_str())
        state["mlgate"] = {"max_length": self.max_length}
        path.write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path) -> TextEncoder:
        from tokenizers import Tokenizer

        state = json.loads(Path(path).read_text(encoding="utf-8"))
        settings = state.pop("mlgate", {})
        return cls(Tokenizer.from_str(json.dumps(state)), int(settings.get("max_length", 256)))


def _words(tokens: list[str]) -> list[str]:
    # punctuation is no word; `isalnum` first: most tokens are words, and it is 4× faster than looking at each
    # character of 700,000 (a news job's training texts)
    return [t for t in tokens if t.isalnum() or any(c.isalnum() for c in t)]


def bigram_hashes(words: Sequence[str]) -> np.ndarray:
    """Each adjacent pair of `words`, hashed to 32 bits (BLAKE2b, the same in every process, unlike hash()): a
    pair the reference never had collides with one it had about once in 10,000 for 400,000 stored pairs."""
    from hashlib import blake2b

    return np.array([int.from_bytes(blake2b(f"{a} {b}".encode(), digest_size=4).digest(), "little")
                     for a, b in zip(words, words[1:])], dtype=np.uint32)


def _share_in(values: np.ndarray, sorted_set: np.ndarray) -> float:
    """The share of `values` found in `sorted_set` (binary search: the set is sorted once, when stored); 1 for none."""
    if not len(values):
        return 1.0
    at = np.minimum(np.searchsorted(sorted_set, values), max(len(sorted_set) - 1, 0))
    return float((sorted_set[at] == values).mean()) if len(sorted_set) else 0.0


class Tokenize:
    """WordPiece, lower-cased with accents stripped, trained on the training split's texts only."""

    name = "tokenize"
    input_dtype = np.dtype(object)

    def __init__(self, vocab_size: int = 8000, max_length: int = 256, min_frequency: int = 2) -> None:
        if not (100 <= vocab_size <= 1_000_000) or not (1 <= max_length <= 8192):
            raise ContractError(f"tokenize: vocab_size {vocab_size} (100..1,000,000) or max_length {max_length} "
                                "(1..8192) out of range")
        self.vocab_size, self.max_length, self.min_frequency = vocab_size, max_length, min_frequency

    def fit(self, texts: Sequence[str]) -> TextEncoder:
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.WordPiece(unk_token=UNK))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=self.vocab_size, min_frequency=self.min_frequency,
                                            special_tokens=[PAD, UNK], show_progress=False)
        tokenizer.train_from_iterator(list(texts), trainer=trainer)
        # the trainer numbers its '##' pieces in hash-map order, which changes from process to process
        # (huggingface/tokenizers#1794): the same texts gave other ids, so other embedding rows, every run.
        # WordPiece encodes by longest match on the vocabulary alone, so renumbering it changes no tokenization
        trained = tokenizer.model
        vocab = tokenizer.get_vocab()
        order = [PAD, UNK, *sorted(set(vocab) - {PAD, UNK})]
        tokenizer.model = models.WordPiece({token: i for i, token in enumerate(order)}, unk_token=trained.unk_token,
                                           continuing_subword_prefix=trained.continuing_subword_prefix,
                                           max_input_chars_per_word=trained.max_input_chars_per_word)
        return TextEncoder(tokenizer, self.max_length)


BUILT_IN: dict[str, Callable[..., Any]] = {"pixels": Pixels, "tokenize": Tokenize}


def declared_step(model: str, module: Any) -> Any:
    """The model file's `preprocess`, as an object with fit(); None when it declares none."""
    declared = getattr(module, "preprocess", None)
    if declared is None:
        return None
    where = f"models.{model}: preprocess"
    known = ", ".join([*PREPROCESSORS, *BUILT_IN])
    options: dict[str, Any] = {}
    if isinstance(declared, dict):
        if len(declared) != 1 or not isinstance(next(iter(declared.values())), dict):
            raise ContractError(f"{where}: a dict names one step and its options, e.g. "
                                "{\"tokenize\": {\"vocab_size\": 8000}}")
        declared, options = next(iter(declared.items()))
    if isinstance(declared, str):
        if declared in PREPROCESSORS and not options:
            return PREPROCESSORS[declared]
        if declared not in BUILT_IN:
            raise ContractError(f"{where}: unknown step {declared!r} (known: {known})",
                                hint="or assign an object with fit(x_train) -> nn.Module")
        try:
            return BUILT_IN[declared](**options)
        except TypeError as exc:
            raise ContractError(f"{where}: {declared}: {exc}") from None
    if not callable(getattr(declared, "fit", None)):
        raise ContractError(f"{where}: {type(declared).__name__} has no fit(x_train) method")
    return declared


def preprocess_name(module: Any) -> str | None:
    declared = getattr(module, "preprocess", None)
    if declared is None:
        return None
    if isinstance(declared, dict):
        return next(iter(declared), None)
    return declared if isinstance(declared, str) else type(declared).__name__


def is_text_step(step: Any) -> bool:
    return isinstance(step, Tokenize)


def fit_preprocess(model: str, module: Any, x_train: Any) -> nn.Module | TextEncoder | None:
    """The model file's `preprocess`, fitted on the training split only; None when it declares none."""
    step = declared_step(model, module)
    if step is None:
        return None
    where = f"models.{model}: preprocess"
    try:
        fitted = step.fit(x_train)
    except ContractError as exc:
        raise ContractError(f"{where}: {exc}") from None
    if isinstance(fitted, TextEncoder):
        return fitted
    if not isinstance(fitted, torch.nn.Module):
        raise ContractError(f"{where}: fit() returned {type(fitted).__name__}, expected an nn.Module")
    if any(p.requires_grad for p in fitted.parameters()):
        raise ContractError(f"{where}: the fitted step has trainable parameters; keep statistics in buffers")
    return fitted.eval()


class WithPreprocessing(nn.Sequential):
    """The user's network behind its fitted pre-processing: the registered model takes raw inputs."""
