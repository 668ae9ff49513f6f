"""Drift for image and text models: on the model's embeddings, and for text also on text descriptors.

The reference (logged by the job with each version, `reference/train.npz`) holds the embeddings of examples
the version never trained on (validation and test: the embeddings of training examples are tighter than
any new input's, which would read as drift), and for a text model the descriptors of those texts.
`mlgate monitor` embeds the current window (raw inputs from the inference log) with the same version, and
Evidently compares them:
- embeddings: Evidently's model-based embedding drift (a classifier told to separate reference from current;
  drift when its ROC AUC on held-out rows exceeds `embedding_auc_threshold`);
- descriptors (`TextEncoder.descriptors`: length, out-of-vocabulary share, uppercase share, [UNK] share, and the
  share of adjacent-word pairs the training texts had, against the hashed pairs the reference stores as
  `bigram_hashes`): Evidently's per-column drift tests. A reference logged before a descriptor existed lacks
  it, and that descriptor is not tested.

The drift share is over signals, not tests: the embeddings, and the text descriptors together (drifted when any
one is). Each test is calibrated to a rare false alarm, so one drifted descriptor (all-uppercase text moves only
`uppercase_share`) reaches the default `drift.threshold`, however many descriptors there are.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from automation.errors import MlgateError, UsageError

EMBEDDINGS = "embeddings"
EMBEDDING_AUC_THRESHOLD = 0.55   # Evidently's default for its model-based method: the floor
NULL_SPREAD = 4.0                # standard deviations of the AUC under no drift: ~3e-5 false alarms per window
DESCRIPTOR_P_VALUE = 1e-4        # a text descriptor drifts below this p-value
FEW_VALUES = 5                   # Evidently's own cut: a column with no more distinct values is categorical
MAX_ROWS = 5000                  # of each side: the classifier and the report's t-SNE stay bounded


@dataclass
class EmbeddingReference:
    embeddings: np.ndarray
    descriptors: dict[str, np.ndarray]   # a text model's; empty for images
    input_kind: str                      # "image" or "text"
    input_shape: tuple[int, ...]
    torch_uri: str                       # the version's torch model: what embeds the current window
    version: str
    bigrams: np.ndarray | None = None    # hashed word pairs of the training texts; None in older references


def read_embedding_reference(data: Any, version: str) -> EmbeddingReference:
    """From a loaded reference .npz that holds `embeddings`."""
    descriptors = {str(name[len("descriptor_"):]): data[name] for name in data.files if name.startswith("descriptor_")}
    bigrams = data["bigram_hashes"] if "bigram_hashes" in data.files else None
    return EmbeddingReference(data["embeddings"], descriptors, str(data["input_kind"]),
                              tuple(int(d) for d in data["input_shape"]), str(data["torch_uri"]), version, bigrams)


def read_raw_window(files: list[Path], rows: int, reference: EmbeddingReference) -> tuple[np.ndarray, list[Path]]:
    """The newest `rows` raw inputs: texts from a `text` column, or images from pixel columns x0, x1, …
    (as the inference log writes them) or an .npz `x`; oldest file first."""
    import pandas as pd

    parts: list[np.ndarray] = []
    used: list[Path] = []
    width = int(np.prod(reference.input_shape)) if reference.input_kind == "image" else 0
    for file in reversed(files):
        if file.suffix == ".npz":
            with np.load(file, allow_pickle=False) as data:
                if "x" not in data:
                    raise UsageError(f"{file}: an .npz window needs an array named 'x'")
                x = data["x"]
        else:
            frame = pd.read_parquet(file) if file.suffix == ".parquet" else pd.read_csv(file)
            if reference.input_kind == "text":
                if "text" not in frame.columns:
                    raise UsageError(f"{file}: no 'text' column (a text model's window)")
                x = frame["text"].astype(str).to_numpy(dtype=object)
            else:
                columns = [f"x{i}" for i in range(width)]
                missing = [c for c in columns if c not in frame.columns]
                if missing:
                    raise UsageError(f"{file}: no column {missing[0]!r} of the model's {width} pixels")
                x = frame[columns].to_numpy()
        if reference.input_kind == "image":
            if x.size % width:
                raise UsageError(f"{file}: rows of {x.size // max(len(x), 1)} values; the model's images have {width}")
            if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all() or x.min() < 0 or x.max() > 255:
                raise UsageError(f"{file}: pixel values outside 0..255")
            x = x.reshape((-1, *reference.input_shape)).astype(np.uint8)
        parts.insert(0, x)
        used.append(file)
        if sum(len(p) for p in parts) >= rows:
            break
    window = np.concatenate(parts)[-rows:]
    if len(window) == 0:
        raise UsageError("the window is empty")
    return window, used


def embed_window(reference: EmbeddingReference, window: np.ndarray, model_dir: Path) -> tuple[np.ndarray, dict]:
    """The current window's embeddings (and a text model's descriptors), by the reference's version."""
    import mlflow.pytorch

    from automation.embeddings import embed
    from automation.preprocess import TOKENIZER_FILE, TextEncoder

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=reference.torch_uri, dst_path=str(model_dir)))
        model = mlflow.pytorch.load_model(str(local), map_location="cpu")
    except Exception as exc:
        raise MlgateError(f"cannot load version {reference.version}'s torch model to embed the window "
                          f"({type(exc).__name__})") from None
    encoder = None
    if reference.input_kind == "text":
        found = next(local.rglob(TOKENIZER_FILE), None)
        if found is None:
            raise MlgateError(f"version {reference.version} is a text model but holds no {TOKENIZER_FILE}")
        encoder = TextEncoder.load(found)
    descriptors = encoder.descriptors(list(window), reference.bigrams) if encoder is not None else {}
    return embed(model, window, encoder), descriptors


def _sample(x: np.ndarray, rows: int, seed: int = 0) -> np.ndarray:
    if len(x) <= rows:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), rows, replace=False))]


def embedding_auc_threshold(reference_rows: int, current_rows: int) -> float:
    """The ROC AUC above which the windows differ. Evidently scores its classifier on a random half of both
    sides; with no drift that AUC is centred on 0.5 with the Mann-Whitney spread sqrt((a+b+1)/(12ab)). A fixed
    0.55 is 2.4 spreads for 400 rows against 5,000, and measured 1 false alarm in 20 unshifted windows; this
    stays NULL_SPREAD spreads out at any window size, and never under Evidently's 0.55."""
    a = max(1, min(reference_rows, MAX_ROWS) // 2)
    b = max(1, min(current_rows, MAX_ROWS) // 2)
    return max(EMBEDDING_AUC_THRESHOLD, 0.5 + NULL_SPREAD * float(np.sqrt((a + b + 1) / (12 * a * b))))


def embedding_drift_score(reference: np.ndarray, current: np.ndarray) -> float:
    """Evidently's model-based embedding drift, without its report: the ROC AUC of a classifier separating
    reference from current rows (0.5: indistinguishable)."""
    import pandas as pd
    from evidently.metrics.embeddings import ModelDriftMethod

    names = [f"e{i}" for i in range(reference.shape[1])]
    method = ModelDriftMethod(threshold=EMBEDDING_AUC_THRESHOLD, bootstrap=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score, _, _ = method(pd.DataFrame(_sample(current, MAX_ROWS), columns=names),
                             pd.DataFrame(_sample(reference, MAX_ROWS), columns=names))
    return float(score)


def descriptor_test(column: str, reference_rows: int, few_values: bool = False) -> Any:
    """Evidently's drift test for one text descriptor. Up to 1,000 reference rows Evidently picks a p-value
    test (Kolmogorov-Smirnov; a Z or chi-square test when the values are few) at p < 0.05: with two
    descriptors that fires on about one unshifted window in ten (measured: benchmarks/text_drift.py), so the
    p-value is DESCRIPTOR_P_VALUE instead, as rare a false alarm as the embedding test's. Over 1,000 rows,
    Evidently's distances (a size, not a p-value) keep their own thresholds.

    A descriptor with `few_values` (at most FEW_VALUES distinct, as `unknown_token_share`: almost always 0) is
    still a number: Evidently would read its values as categories, and one text with a share the reference never
    had is then a category at p = 0 (3 false alarms in 20 unshifted windows, measured), so it gets
    Kolmogorov-Smirnov, which orders them."""
    from evidently.metrics import ValueDrift

    if few_values:
        return ValueDrift(column=column, method="ks", threshold=DESCRIPTOR_P_VALUE)
    if reference_rows <= 1000:
        return ValueDrift(column=column, threshold=DESCRIPTOR_P_VALUE)
    return ValueDrift(column=column)


def drift_tests(reference: EmbeddingReference, current: np.ndarray, current_descriptors: dict,
                picture: bool = True) -> tuple[Any, list[dict[str, Any]]]:
    """Every test: column, score, method, threshold, drifted; and Evidently's report of them (None when there is
    nothing to report). The embedding test is `embedding_drift_score`'s; with `picture`, the report also holds
    Evidently's embedding drift with its t-SNE picture (1.3 s of t-SNE on 2 cores; the same deterministic
    classifier, so the same score)."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift
    from evidently.metrics.embeddings import ModelDriftMethod

    ref_emb, cur_emb = _sample(reference.embeddings, MAX_ROWS), _sample(current, MAX_ROWS)
    score, threshold = embedding_drift_score(ref_emb, cur_emb), embedding_auc_threshold(len(ref_emb), len(cur_emb))
    tests = [{"column": EMBEDDINGS, "score": score, "method": "model ROC AUC (Evidently)",
              "threshold": round(threshold, 4), "drifted": score > threshold}]
    names = [f"e{i}" for i in range(ref_emb.shape[1])]
    descriptor_names = sorted(reference.descriptors)
    definition = DataDefinition(numerical_columns=names + descriptor_names, embeddings={EMBEDDINGS: names},
                                categorical_columns=[], text_columns=[], datetime_columns=[], unknown_columns=[],
                                list_columns=[])

    def dataset(embeddings: np.ndarray, descriptors: dict[str, np.ndarray]) -> Any:
        frame = pd.DataFrame(embeddings, columns=names)
        for name in descriptor_names:
            frame[name] = _sample(descriptors[name], MAX_ROWS) if len(descriptors[name]) > MAX_ROWS else \
                descriptors[name]
        return Dataset.from_pandas(frame, data_definition=definition)

    metrics: list[Any] = [EmbeddingsDrift(embeddings_name=EMBEDDINGS,
                                          drift_method=ModelDriftMethod(threshold=EMBEDDING_AUC_THRESHOLD,
                                                                        bootstrap=False))] if picture else []
    few = {name: len(np.unique(np.concatenate([reference.descriptors[name], current_descriptors[name]]))) <= FEW_VALUES
           for name in descriptor_names}
    metrics += [descriptor_test(name, len(ref_emb), few[name]) for name in descriptor_names]
    if not metrics:
        return None, tests
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snapshot = Report(metrics).run(current_data=dataset(cur_emb, current_descriptors),
                                       reference_data=dataset(ref_emb, reference.descriptors))
    for metric in snapshot.dict()["metrics"]:
        cfg = metric.get("config", {})
        if cfg.get("type", "").endswith("ValueDrift"):
            value, limit = float(metric["value"]), float(cfg.get("threshold"))
            # a test Evidently picks is named by its display name, one named here by its id
            method = {"ks": "K-S p_value"}.get(str(cfg.get("method")), str(cfg.get("method")))
            tests.append({"column": cfg.get("column"), "score": value, "method": method, "threshold": limit,
                          "drifted": (value < limit) if "p_value" in method else (value >= limit)})
    if len(tests) != 1 + len(descriptor_names):
        raise MlgateError("Evidently returned no drift result for some text descriptors")
    return snapshot, tests


def signal_share(tests: list[dict[str, Any]]) -> float:
    """The drift share over signals: the embeddings, and a text model's descriptors together (drifted when any
    one is)."""
    signals = [any(t["drifted"] for t in tests if t["column"] == EMBEDDINGS)]
    descriptors = [t["drifted"] for t in tests if t["column"] != EMBEDDINGS]
    if descriptors:
        signals.append(any(descriptors))
    return sum(signals) / len(signals)


def compute_embedding_drift(reference: EmbeddingReference, current: np.ndarray, current_descriptors: dict,
                            report_html: Path) -> tuple[list[dict[str, Any]], int, float]:
    """The report saved as `report_html`; the drifted tests (column, score, method, threshold), how many tests
    ran, and the drift share (`signal_share`)."""
    snapshot, tests = drift_tests(reference, current, current_descriptors)
    report_html.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(report_html))
    drifted = [{k: v for k, v in test.items() if k != "drifted"} for test in tests if test["drifted"]]
    return drifted, len(tests), signal_share(tests)
