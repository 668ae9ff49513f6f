"""Masking credentials in any text that can leave mlgate: logs, HTTP answers, /healthz, GitHub comments.

Three kinds are masked: credentials inside URLs (`scheme://user:pass@host`), credentials by their shape
(bearer tokens, GitHub tokens, mlgate's result credentials), and the values of this process's secret
environment variables wherever they appear. The last catches what no pattern knows.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
# an environment variable whose name has one of these words holds a secret
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|API_KEY|ACCESS_KEY|_AUTH", re.I)
MIN_SECRET_LENGTH = 6   # shorter values ("1", "true") would mask ordinary words
_SHAPES = [
    (re.compile(r"://[^/@\s]+@"), f"://{MASK}@"),                                   # URL userinfo
    (re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=-]{8,}"), rf"\1 {MASK}"),
    (re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"), MASK),
    (re.compile(r"\b[\w-]+\.\d+\.\d+\.[0-9a-f]{64}\b"), MASK),                        # a result credential
    (re.compile(r"(?i)([?&](?:token|access_token|password|secret|sig|signature)=)[^&\s]+"), rf"\1{MASK}"),
]


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """This process's secret values, longest first (so a secret containing another is masked whole)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    """`text` with credentials masked; `secrets`: secret_values() when the caller already read them."""
    for pattern, replacement in _SHAPES:
        text = pattern.sub(replacement, text)
    for value in secret_values() if secrets is None else secrets:
        if value in text:
            text = text.replace(value, MASK)
    return text


def redact_value(value: Any, secrets: list[str] | None = None) -> Any:
    """`redact` through the strings of a JSON-like value (dicts, lists), leaving other types alone; the
    environment is read once for the whole value, not once per string."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {k: redact_value(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v, secrets) for v in value]
    return value


def redact_url(url: str) -> str:
    """Drop credentials from a URL before it reaches a log or an error message."""
    from sqlalchemy.engine import make_url

    try:
        return redact(make_url(url).render_as_string(hide_password=True))
    except Exception:  # not a database URL: hide anything between scheme and host
        return redact(url)
