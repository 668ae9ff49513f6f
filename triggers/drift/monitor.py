"""`mlgate monitor`: data drift between a model's reference data (the training split logged with
its production version) and a window of current inputs, with Evidently; publishes a drift
CloudEvent when the model's policy says so, and keeps Evidently's HTML report.

Current data is a file or a directory of files: .npz (array `x`, positional), .parquet or .csv
(the reference's feature columns by name, or x0, x1, … when the model's features have no names, and
optionally `timestamp`, as the inference log writes them; other columns such as `prediction`,
`version` or `label` are ignored). A window smaller than the policy's `min_window_rows` is not tested.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from automation.config import MlgateConfig
from automation.errors import MlgateError, UsageError

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".npz", ".parquet", ".csv")
MAX_REFERENCE_ROWS = 5000


@dataclass
class Window:
    x: np.ndarray
    start: datetime
    end: datetime
    files: list[str] = field(default_factory=list)


@dataclass
class Reference:
    x: np.ndarray
    names: list[str]              # the model's feature names; x0, x1, … when it has none
    version: str


@dataclass
class DriftResult:
    share: float
    columns: list[dict[str, Any]]      # drifted columns only: column, score, method, threshold
    total_columns: int
    reference_rows: int
    current_rows: int
    report_html: str


def feature_names(width: int) -> list[str]:
    return [f"x{i}" for i in range(width)]


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)


def _read_file(path: Path, names: list[str] | None) -> tuple[np.ndarray, datetime, datetime]:
    if path.suffix == ".npz":
        with np.load(path) as data:
            if "x" not in data:
                raise UsageError(f"{path}: an .npz window needs an array named 'x'")
            x = data["x"]
        return x.reshape(len(x), -1).astype(np.float32), _mtime(path), _mtime(path)
    import pandas as pd

    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if names is None:   # no reference to name them: every positional feature column
        columns = sorted((c for c in frame.columns if c[:1] == "x" and c[1:].isdigit()), key=lambda c: int(c[1:]))
        if not columns:
            raise UsageError(f"{path}: no feature columns (x0, x1, …)")
    else:
        columns = list(names)
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UsageError(f"{path}: no column {missing[0]!r}{more}, a feature of the model")
    if "timestamp" in frame.columns and "timestamp" not in columns and len(frame):
        stamps = pd.to_datetime(frame["timestamp"], utc=True)
        start, end = stamps.min().to_pydatetime(), stamps.max().to_pydatetime()
    else:
        start = end = _mtime(path)
    try:
        return frame[columns].to_numpy(np.float32), start, end
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{path}: feature columns are not all numeric ({exc})") from None


def data_files(path: Path) -> list[Path]:
    """The data files of a file or directory, oldest first."""
    if not path.exists():
        raise UsageError(f"current data {path} does not exist")
    files = sorted((p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES), key=lambda p: p.stat().st_mtime) \
        if path.is_dir() else [path]
    if not files:
        raise UsageError(f"{path} holds no {'/'.join(DATA_SUFFIXES)} files")
    return files


def load_window(path: Path, rows: int, names: list[str] | None = None) -> Window:
    """The newest `rows` rows of a file or a directory of files (oldest file first); table columns are read
    by `names` (the reference's), or all of x0, x1, … when None."""
    files = data_files(path)
    parts, starts, ends, used = [], [], [], []
    for file in reversed(files):                    # newest first, until the window is full
        x, start, end = _read_file(file, names)
        parts.insert(0, x)
        starts.append(start)
        ends.append(end)
        used.append(str(file))
        if sum(len(p) for p in parts) >= rows:
            break
    widths = {p.shape[1] for p in parts}
    if len(widths) != 1:
        raise UsageError(f"{path}: files disagree on the number of features ({sorted(widths)})")
    x = np.concatenate(parts)[-rows:]
    if len(x) == 0:
        raise UsageError(f"{path}: the window is empty")
    return Window(x, min(starts), max(ends), used)


def read_reference(path: Path, version: str) -> Any:
    """A logged `train.npz`: `x` and `features` (the names; empty, or absent in older versions, for none);
    or, for an image or text model, its embeddings (triggers/drift/embeddings.py)."""
    with np.load(path) as data:
        if "embeddings" in data:
            from triggers.drift.embeddings import read_embedding_reference

            return read_embedding_reference(data, version)
        x = data["x"]
        names = [str(n) for n in data["features"]] if "features" in data else []
    x = x.reshape(len(x), -1)
    if names and len(names) != x.shape[1]:
        raise MlgateError(f"reference data of version {version} names {len(names)} features for {x.shape[1]} columns")
    return Reference(x, names or feature_names(x.shape[1]), version)


def load_reference(config: MlgateConfig, model: str) -> Any:
    """The training split logged with the production version, its feature names, and that version."""
    import mlflow

    from automation import promote, tracking
    from automation.job import REFERENCE_FILE

    client, _ = tracking.connect(config.workdir, config.experiment)
    version = promote.alias_version(client, model, promote.PRODUCTION)
    if version is None:
        raise MlgateError(f"{model} has no production version yet; there is no reference to compare with",
                          hint="promote a version first (mlgate run)")
    run_id = client.get_model_version(model, version).run_id
    target = config.workdir / "monitor" / model / f"reference-v{version}"
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"reference/{REFERENCE_FILE}",
                                                    dst_path=str(target))
    except Exception as exc:
        raise MlgateError(f"{model} version {version} has no reference data logged ({type(exc).__name__})",
                          hint="versions trained before mlgate logged references need one retrain") from None
    return read_reference(Path(local), version)


def compute_drift(reference: np.ndarray, current: np.ndarray, report_html: Path,
                  names: list[str] | None = None) -> DriftResult:
    """Evidently's DataDriftPreset over every feature column (named `names`, x0, x1, … by default);
    per-column tests pick their own method."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    if reference.shape[1] != current.shape[1]:
        raise UsageError(f"current data has {current.shape[1]} features, the reference {reference.shape[1]}")
    rng = np.random.default_rng(0)
    if len(reference) > MAX_REFERENCE_ROWS:   # bounded cost: Evidently's time grows with rows × columns
        reference = reference[rng.choice(len(reference), MAX_REFERENCE_ROWS, replace=False)]
    names = list(names) if names is not None else feature_names(reference.shape[1])
    if len(names) != reference.shape[1]:
        raise UsageError(f"{len(names)} feature names for {reference.shape[1]} reference columns")
    # every column is a numerical feature, whatever its name: no guessing of ids, timestamps or targets
    definition = DataDefinition(numerical_columns=names, categorical_columns=[], text_columns=[],
                                datetime_columns=[], unknown_columns=[], list_columns=[])

    def dataset(x: np.ndarray) -> Any:
        return Dataset.from_pandas(pd.DataFrame(x, columns=names), data_definition=definition)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # constant columns make scipy warn about division by zero
        snapshot = Report([DataDriftPreset()]).run(current_data=dataset(current), reference_data=dataset(reference))
    report_html.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(report_html))
    drifted, total = [], 0
    for metric in snapshot.dict()["metrics"]:
        cfg = metric.get("config", {})
        if not cfg.get("type", "").endswith("ValueDrift"):
            continue
        total += 1
        score, method, threshold = float(metric["value"]), str(cfg.get("method")), float(cfg.get("threshold"))
        # p-value tests drift below the threshold; distances drift at or above it
        is_drift = score < threshold if "p_value" in method else score >= threshold
        if is_drift:
            drifted.append({"column": cfg.get("column"), "score": score, "method": method, "threshold": threshold})
    if total == 0:
        raise MlgateError("Evidently returned no per-column drift results")
    return DriftResult(len(drifted) / total, drifted, total, len(reference), len(current), str(report_html))


def publish_event(event: dict[str, Any], topic: str, bootstrap: str | None, post_url: str | None) -> list[str]:
    """To Kafka (when there are brokers) and/or HTTP POST to the service; returns where it went."""
    sent = []
    if bootstrap:
        from triggers.drift.consumer import publish

        publish(bootstrap, topic, [event])
        sent.append(f"kafka:{bootstrap}")
    if post_url:
        sent.append(post_drift_event(post_url, event))
    return sent


def post_drift_event(url: str, event: dict[str, Any]) -> str:
    """POST the event to the service, signed with MLGATE_DRIFT_SECRET (or with the bearer MLGATE_DRIFT_TOKEN);
    returns the URL as it may be shown (credentials in it are hidden)."""
    import httpx

    from automation.redaction import redact, redact_url
    from triggers.request_guard import SIGNATURE_HEADER, sign

    shown = redact_url(url)
    secret, token = os.environ.get("MLGATE_DRIFT_SECRET"), os.environ.get("MLGATE_DRIFT_TOKEN")
    if not (secret or token):
        raise MlgateError("--post needs MLGATE_DRIFT_SECRET or MLGATE_DRIFT_TOKEN: the service refuses "
                          "unauthenticated drift events")
    body = json.dumps(event, default=str).encode()
    headers = {"Content-Type": "application/json"}
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, body)
    else:
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise MlgateError(f"POST {shown} failed: {type(exc).__name__}: {redact(str(exc))[:200]}") from None
    if response.status_code >= 400:
        raise MlgateError(f"POST {shown} answered {response.status_code}: {redact(response.text[:200])}")
    return shown


def prune_reports(directory: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` drift-*.html reports (and their .json siblings); returns what was deleted."""
    reports = sorted(directory.glob("drift-*.html"))   # UTC stamps: name order is time order
    deleted = []
    for old in reports[:-keep]:
        for path in (old, old.with_suffix(".json")):
            path.unlink(missing_ok=True)
            deleted.append(path)
    return deleted


def run_monitor(config: MlgateConfig, model: str, current: Path, *, data_ref: str | None = None,
                kafka_bootstrap: str | None = None, post_url: str | None = None,
                publish: bool = True) -> dict[str, Any]:

    from triggers.drift.embeddings import EmbeddingReference

    policy = config.model(model).drift
    files = data_files(current)                         # a missing window fails before any download
    reference = load_reference(config, model)
    if isinstance(reference, EmbeddingReference):
        return _monitor_embeddings(config, model, files, reference, data_ref, kafka_bootstrap, post_url, publish)
    window = load_window(current, policy.window_rows, reference.names)
    base = {"model": model, "production_version": reference.version, "threshold": policy.threshold,
            "current_rows": len(window.x)}
    if len(window.x) < policy.min_window_rows:         # chance differences would read as drift
        return _not_tested(base, len(reference.names), len(reference.x), policy.min_window_rows)
    directory = config.workdir / "monitor" / model
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S_%fZ")
    result = compute_drift(reference.x, window.x, directory / f"drift-{stamp}.html", reference.names)
    return _decide(config, model, base, result, window.start, window.end, data_ref, kafka_bootstrap, post_url,
                   publish)


def _not_tested(base: dict[str, Any], columns: int, reference_rows: int, min_rows: int) -> dict[str, Any]:
    summary = base | {"tested": False, "drift_share": None, "drifted_columns": 0, "drifted": [],
                      "total_columns": columns, "reference_rows": reference_rows,
                      "retrain": False, "event_id": None, "published_to": [], "report": None,
                      "note": f"window of {base['current_rows']} rows is below drift.min_window_rows "
                              f"({min_rows}): not tested"}
    log.info("drift not tested", extra={k: v for k, v in summary.items() if k != "report"})
    return summary


def _monitor_embeddings(config: MlgateConfig, model: str, files: list[Path], reference: Any, data_ref: str | None,
                        kafka_bootstrap: str | None, post_url: str | None, publish: bool) -> dict[str, Any]:
    """An image or text model: the window's raw inputs embedded by the production version, then compared."""
    from triggers.drift.embeddings import compute_embedding_drift, embed_window, read_raw_window

    policy = config.model(model).drift
    window, used = read_raw_window(files, policy.window_rows, reference)
    base = {"model": model, "production_version": reference.version, "threshold": policy.threshold,
            "current_rows": len(window), "compared": "embeddings" + (" and text descriptors"
                                                                     if reference.descriptors else "")}
    tests = 1 + len(reference.descriptors)
    if len(window) < policy.min_window_rows:
        return _not_tested(base, tests, len(reference.embeddings), policy.min_window_rows)
    directory = config.workdir / "monitor" / model
    embeddings, descriptors = embed_window(reference, window, directory / f"model-v{reference.version}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S_%fZ")
    drifted, total, share = compute_embedding_drift(reference, embeddings, descriptors,
                                                    directory / f"drift-{stamp}.html")
    result = DriftResult(share, drifted, total, len(reference.embeddings), len(window),
                         str(directory / f"drift-{stamp}.html"))
    times = [_mtime(f) for f in used]
    return _decide(config, model, base, result, min(times), max(times), data_ref, kafka_bootstrap, post_url, publish)


def _named(columns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What moved, most drifted first: column, method, score and threshold as plain floats (JSON-ready)."""
    # six significant digits, not six decimals: a p-value of 3e-9 stays 3e-9, not 0
    rows = [{"column": str(c["column"]), "method": str(c["method"]), "score": float(f"{float(c['score']):.6g}"),
             "threshold": float(c["threshold"])} for c in columns]
    # p-values drift when small, distances and AUCs when large: rank by how far past the threshold
    def margin(c: dict[str, Any]) -> float:
        if "p_value" in c["method"]:
            return c["threshold"] - c["score"]
        return c["score"] - c["threshold"]
    return sorted(rows, key=margin, reverse=True)


def _decide(config: MlgateConfig, model: str, base: dict[str, Any], result: DriftResult, start: datetime,
            end: datetime, data_ref: str | None, kafka_bootstrap: str | None, post_url: str | None,
            publish: bool) -> dict[str, Any]:
    """Retrain or not by the model's policy; publish the event; write the summary beside the report."""
    from triggers.drift.events import make_event

    policy = config.model(model).drift
    directory = config.workdir / "monitor" / model
    retrain = result.share >= policy.threshold
    drifted = _named(result.columns)                       # the event lists them as the summary does
    event = make_event(model, result.share, drifted, start, end,
                       data_ref=os.path.abspath(data_ref) if data_ref else None)
    sent = publish_event(event, config.service.kafka.topic, kafka_bootstrap, post_url) if retrain and publish else []
    summary = base | {"tested": True, "drift_share": round(result.share, 4),
                      "drifted_columns": len(drifted), "drifted": drifted,
                      "total_columns": result.total_columns,
                      "reference_rows": result.reference_rows, "current_rows": result.current_rows,
                      "retrain": retrain, "event_id": event["id"] if sent else None, "published_to": sent,
                      "report": result.report_html}
    log.info("drift computed", extra={k: v for k, v in summary.items() if k != "report"})
    if retrain and publish and not sent:
        summary["note"] = "drift above threshold but nowhere to publish: set KAFKA_BOOTSTRAP_SERVERS or --post"
    (Path(result.report_html).with_suffix(".json")).write_text(json.dumps(summary | {"event": event}, indent=2,
                                                                           default=str), encoding="utf-8")
    prune_reports(directory, policy.keep_reports)
    return summary
