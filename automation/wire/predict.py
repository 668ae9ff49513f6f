"""A `/predict` body → the batch a served version takes: image files or texts for an image or text version,
else numbers (arrays shaped like the version's examples, or records keyed by feature name)."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from automation.wire import raw_inputs
from automation.wire.json_inputs import BadInput, parse_inputs, suspect_body

# what a client that writes NaN or Infinity into JSON (Python's json.dumps does) needs to hear
NOT_JSON_NUMBERS = (b"NaN", b"Infinity")


def not_json(raw: bytes, what: str = "the body") -> BadInput:
    """The 400 for a body orjson refused, saying why when it holds NaN or Infinity (not JSON values)."""
    if any(token in raw for token in NOT_JSON_NUMBERS):
        return BadInput(f"{what} is not valid JSON: NaN and Infinity are not JSON values (a missing value is "
                        "written null in JSON; this model takes no missing values, so fill them in first)", 400)
    return BadInput(f"{what} is not valid JSON", 400)


def parse_predict(raw: bytes, kind: str, shape: tuple[int, ...], dtype: str, max_batch: int,
                  features: tuple[str, ...] | None = None) -> np.ndarray:
    # orjson reads JSON as the standard has it: NaN and Infinity are not numbers there (400, not JSON)
    try:
        body: Any = orjson.loads(raw)
    except (ValueError, RecursionError):
        raise not_json(raw) from None
    if kind in ("text", "image") and isinstance(body, dict) and isinstance(body.get("inputs"), list) \
            and body["inputs"] and len(body["inputs"]) <= max_batch:
        if kind == "text":
            return raw_inputs.texts(body["inputs"])
        files = raw_inputs.images(body["inputs"], shape)
        if files is not None:
            return files
    return parse_inputs(body, shape, dtype, max_batch, features, suspect_body(raw))
