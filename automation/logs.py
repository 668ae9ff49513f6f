"""Structured logs: one JSON object per line on stderr, with the `extra=` fields inlined."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from datetime import datetime, timezone
from pathlib import Path

from automation.redaction import MASK, redact, redact_value, secret_values

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_SECRET_WORDS = ("token", "secret", "password", "authorization")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name}
        secrets = secret_values()   # read once per record
        entry["msg"] = redact(record.getMessage(), secrets)
        for key, value in vars(record).items():
            if key not in _STANDARD:
                entry[key] = MASK if any(w in key.lower() for w in _SECRET_WORDS) else redact_value(value, secrets)
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info), secrets)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: int | str = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("automation", "triggers", "models"):
        logging.getLogger(name).setLevel(level)
    # third-party chatter that says nothing about the job
    for noisy in ("torch.onnx", "torch._inductor", "torch._dynamo", "mlflow", "alembic", "root"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@contextmanager
def captured_output(path: Path) -> Iterator[Path]:
    """Send everything written to stdout/stderr, by Python or by native code and child processes
    (compilers, autotuners, exporters), to `path` instead of the job's streams. The file is kept
    beside the job's artifacts and its tail is logged at debug level."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with path.open("ab") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with open(sink.fileno(), "w", closefd=False, encoding="utf-8", errors="replace") as text, \
                    redirect_stdout(text), redirect_stderr(text):
                yield path
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
    if path.exists() and path.stat().st_size:
        tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-5:]
        logging.getLogger(__name__).debug("captured output", extra={"file": str(path), "tail": tail})
