"""The serving round trip, part of the model contract: a few of the loader's own examples are written as a
client would send them (JSON arrays or records, PNG files, text, KServe v2 tensors), decoded by the very
functions `serve-model` runs (automation/wire/), and must come back as what the loader returned. A model
that serving could not feed is refused before any training; after export, the registered artifact must
answer the same requests as the job's own model did, before any promotion.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from automation.preprocess import ContractError
from automation.wire.json_inputs import BadInput

EXAMPLES = 4          # a handful: one per class first, so every class name is exercised
MAX_BATCH = 64        # what the decoders are told; EXAMPLES stays well under it


@dataclass(frozen=True)
class Signature:
    """What serving will take: the version's raw input (MLmodel `mlgate` metadata, contract.describe)."""
    kind: str                              # "image", "text" or "tensor"
    shape: tuple[int, ...]
    dtype: str                             # "uint8", "string", "float32"
    features: tuple[str, ...] | None

    @classmethod
    def of(cls, described: dict[str, Any]) -> Signature:
        features = described.get("features")
        return cls(str(described["input_kind"]), tuple(int(d) for d in described["input_shape"]),
                   str(described["input_dtype"]), tuple(features) if features else None)

    def text(self) -> str:
        return f"{self.dtype} examples shaped {list(self.shape)}"


def pick_examples(x: Any, y: np.ndarray, count: int = EXAMPLES) -> np.ndarray:
    """Up to `count` examples, the first of each class first (in memory, even from a split on disk)."""
    firsts = [int(np.flatnonzero(y == c)[0]) for c in np.unique(y)][:count]
    rest = [i for i in range(min(len(y), count * 4)) if i not in firsts]
    rows = np.array(sorted((firsts + rest)[:count]), dtype=np.int64)
    return np.asarray(x[rows]) if not isinstance(x, np.ndarray) else x[rows]


# --- what a client sends ------------------------------------------------------------------------------------

def png_bytes(pixels: np.ndarray) -> bytes:
    """One example's uint8 pixels ((H, W) or (C, H, W), C in 1, 3, 4) as a PNG file, as a client saves it."""
    from PIL import Image

    if pixels.ndim == 3:
        pixels = pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def _v2_body(tensor: dict[str, Any], binary: bytes = b"") -> tuple[bytes, str | None]:
    head = orjson.dumps({"inputs": [{"name": "input"} | tensor]})
    return head + binary, (str(len(head)) if binary else None)


def client_requests(signature: Signature, examples: np.ndarray) -> dict[str, Callable[[], np.ndarray]]:
    """Each way a client may send `examples` to `serve-model`, decoded as serving decodes it."""
    from automation.wire import v2_tensors
    from automation.wire.predict import parse_predict

    kind, shape, dtype, n = signature.kind, signature.shape, signature.dtype, len(examples)

    def predict(inputs: list[Any]) -> Callable[[], np.ndarray]:
        body = orjson.dumps({"inputs": inputs})
        return lambda: parse_predict(body, kind, shape, dtype, MAX_BATCH, signature.features)

    def v2(tensor: dict[str, Any], binary: bytes = b"") -> Callable[[], np.ndarray]:
        body, header = _v2_body(tensor, binary)
        return lambda: v2_tensors.parse_infer(body, header, shape, dtype, MAX_BATCH, kind=kind).x

    if kind == "text":
        texts = [str(t) for t in examples.tolist()]
        return {"a JSON /predict request": predict(texts),
                "a KServe v2 BYTES tensor": v2({"datatype": "BYTES", "shape": [n], "data": texts})}
    requests = {"a JSON /predict request": predict(examples.tolist()),
                "a KServe v2 tensor": v2({"datatype": v2_tensors.v2_datatype(dtype), "shape": [n, *shape],
                                          "data": examples.reshape(-1).tolist()})}
    if signature.features and shape == (len(signature.features),):
        requests["JSON records keyed by feature name"] = predict(
            [dict(zip(signature.features, row)) for row in examples.tolist()])
    if kind == "image":
        files = _png_files(signature, examples)
        if isinstance(files, str):
            requests["a PNG file"] = _refused(files)
        else:
            requests["a PNG file"] = predict([{"b64": base64.b64encode(f).decode()} for f in files])
            requests["a KServe v2 BYTES tensor of PNG files"] = v2(
                {"datatype": "BYTES", "shape": [n], "parameters": {"binary_data_size": sum(4 + len(f) for f in files)}},
                b"".join(len(f).to_bytes(4, "little") + f for f in files))
    return requests


def _png_files(signature: Signature, examples: np.ndarray) -> list[bytes] | str:
    shape = signature.shape
    if len(shape) == 3 and shape[0] not in (1, 3, 4):
        layout = " (channels last?)" if shape[-1] in (1, 3, 4) else ""
        return f"a PNG/JPEG file decodes to (H, W) grey or (C, H, W) pixels with C 1, 3 or 4{layout}"
    return [png_bytes(e) for e in examples]


def _refused(reason: str) -> Callable[[], np.ndarray]:
    def decode() -> np.ndarray:
        raise BadInput(reason)
    return decode


# --- the check ----------------------------------------------------------------------------------------------

def decoded_like(decoded: np.ndarray, examples: np.ndarray, signature: Signature) -> bool:
    if decoded.shape != examples.shape:
        return False
    if signature.kind == "text":
        return decoded.tolist() == examples.tolist()
    return bool(np.array_equal(decoded.astype(examples.dtype, copy=False), examples))


def check_round_trip(model: str, signature: Signature, examples: np.ndarray) -> dict[str, np.ndarray]:
    """Every client request of `examples`, decoded as serving decodes it; a ContractError (one line) names
    the first request serving would refuse or decode to something else than the loader returned."""
    where = f"models.{model}: load_data() returned {signature.text()}"
    decoded: dict[str, np.ndarray] = {}
    for route, decode in client_requests(signature, examples).items():
        try:
            batch = decode()
        except BadInput as exc:
            raise ContractError(f"{where}, which serving cannot take as {route}: {exc}",
                                hint="return images as uint8 (N, C, H, W) or (N, H, W), or name an image folder "
                                     "as the model's data (README: Data sources)" if signature.kind == "image"
                                else None) from None
        if not decoded_like(batch, examples, signature):
            raise ContractError(f"{where}, but {route} decodes to {batch.dtype} examples shaped "
                                f"{list(batch.shape[1:])} that differ from them")
        decoded[route] = batch
    return decoded


def answers(network: Any, batch: np.ndarray, encoder: Any = None) -> np.ndarray:
    """The torch model's logits for a decoded batch (a text model's strings through its tokenizer)."""
    import torch

    from automation.predictors import host_batch

    x = encoder.encode(list(batch)) if encoder is not None else host_batch(batch)
    with torch.no_grad():
        return network.eval()(torch.from_numpy(np.ascontiguousarray(x))).float().numpy()


# --- after export: the registered artifact answers as the job's model did -----------------------------------

def served_artifact_check(loaded: Any, chosen: Any, encoder: Any, described: dict[str, Any],
                          served: dict[str, np.ndarray]) -> Any:
    """A gate check: the version as `serve-model` loads it from the registry (`loaded`, a RegisteredModel)
    takes the job's input signature and answers every decoded request as the job's chosen variant did, to
    that variant's precision."""
    from automation import parity
    from automation.gate import Check
    from automation.predictors import predict

    name, metric = "served artifact", "max |Δlogit| vs the job's model"
    expected = Signature.of(described)
    got = Signature(loaded.input_kind, tuple(loaded.input_shape), str(loaded.dtype), loaded.features)
    if got != expected:
        return Check(name, metric, None, "same signature", "failed",
                     f"the registered version takes {got.text()} ({got.kind}); the job's model takes {expected.text()}")
    precision = chosen.precision if chosen.precision in parity.EPSILON else "fp32"
    worst: Any = None
    for route, batch in served.items():
        job = predict(chosen.predictor, encoder.encode(list(batch)) if encoder is not None else batch)
        answered = predict(loaded.predictor, loaded.network_input(list(batch) if encoder is not None else batch))
        result = parity.compare(job, answered, against=f"the job's {chosen.name}", precision=precision)
        if worst is None or result.max_abs_diff > worst[1].max_abs_diff:
            worst = (route, result)
    if worst is None:
        return Check(name, metric, None, "-", "skipped", "no decoded requests to send")
    route, result = worst
    status = "passed" if result.passed and result.argmax_agreement == 1.0 else "failed"
    reason = (f"the registered {loaded.served_as} answers {len(served)} kinds of request as the job's "
              f"{chosen.name} did" if status == "passed" else
              f"the registered {loaded.served_as} answers {route} differently from the job's {chosen.name} "
              f"(max |Δlogit| {result.max_abs_diff:.2e}, {result.argmax_agreement:.0%} same class)")
    return Check(name, metric, result.max_abs_diff, f"≤ {result.tolerance:.2e}", status, reason)
