"""The serving data plane: decode → batch → run → encode, the same steps for `POST /predict` and `/v2/…/infer`.

A route names its codec (predict_route.py, open_inference.py): which version it is for, how large its body may be,
how its body decodes into the input batch and how the answer encodes. The plane does the rest, in order: read the
body (size-limited as it is read), decode it (on the event loop when cheap, else on the inference thread that then
runs it), run it (joined with concurrent requests when dynamic batching is on; beside a rollout's candidate), log it
and encode the answer. A refusal anywhere is a `Refused`, turned into an HTTP answer in `handle` alone.
KServe's `DataPlane` and Triton's request pipeline are the models.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from automation.predictors import RegisteredModel, predict
from automation.wire.json_inputs import BadInput
from triggers.request_guard import BodyRefused, BodyTooLarge, read_body
from triggers.serving.inference_threads import off_loop
from triggers.serving.requests import error_response, log_columns, new_request_id

log = logging.getLogger(__name__)


class Refused(Exception):
    """A request answered with an error: one line, its HTTP status, and the error counter's reason."""

    def __init__(self, message: str, status: int, reason: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


class Decoded(Protocol):
    x: np.ndarray   # the input batch, as the version takes it


class Codec(Protocol):
    """What differs between the inference routes: `resolve` raises Refused, `decode` BadInput."""

    timed: bool   # its requests feed the latency and batch-size histograms

    def resolve(self, server: Any, *path: str) -> Any: ...

    def body_limit(self, loaded: RegisteredModel, max_batch: int) -> int: ...

    def inline(self, raw: bytes, request: Request, loaded: RegisteredModel) -> bool: ...

    def decode(self, raw: bytes, request: Request, loaded: RegisteredModel, max_batch: int) -> Decoded: ...

    def encode(self, model: str, decoded: Any, logits: np.ndarray, predictions: np.ndarray,
               loaded: RegisteredModel, request_id: str) -> Response: ...


async def timed(pending: Awaitable[np.ndarray]) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    result = await pending
    return result, time.perf_counter() - started


def running_rollout(server: Any) -> tuple[Any, Any] | None:
    """The candidate and the rollout's view while a rollout runs, read once (the alias watcher swaps them from
    another thread); None otherwise."""
    candidate, view = server.candidate, server.rollout
    return (candidate, view) if candidate is not None and view is not None and view.state == "running" else None


class DataPlane:
    """One served model's inference path. `server`: the ModelServer (the version served, a rollout's candidate);
    `metrics`: the app's ServingMetrics; `batch_delay_ms`: dynamic batching (None: off)."""

    def __init__(self, server: Any, metrics: Any, inference_log: Any = None, max_batch: int = 1024,
                 batch_delay_ms: float | None = None) -> None:
        self.server, self.metrics, self.inference_log = server, metrics, inference_log
        self.max_batch, self.batch_delay_ms = max_batch, batch_delay_ms
        self.batchers: dict[int, Any] = {}   # id(version loaded) -> its DynamicBatcher
        # a version's cost: on a CPU, the CPU time of the thread that ran the call (ONNX Runtime and torch run it
        # there with one intra-op thread), which waiting for the GIL or a core does not inflate; on a GPU, wall
        # time (the call synchronizes before it returns)
        self.clock = time.perf_counter if server.device.is_cuda else time.thread_time

    async def handle(self, codec: Codec, request: Request, *path: str) -> Response:
        """A request through every step; its answer, or the error answer for the first refusal."""
        started = time.perf_counter()
        try:
            served = codec.resolve(self.server, *path)   # this request's version, whatever swaps meanwhile
            raw = await self.read(request, codec.body_limit(served.loaded, self.max_batch))
            request_id = new_request_id()
            decoded, logits, loaded = await self.decode_and_run(codec, raw, request, served, request_id)
        except Refused as exc:
            self.metrics.errors.labels(exc.reason).inc()
            return error_response(str(exc), exc.status)
        except BodyRefused as exc:   # too slow: the connection is dropped, not held
            return exc.answer()
        predictions = logits.argmax(axis=1)
        self.record(decoded.x, predictions, loaded)
        if codec.timed:
            self.metrics.batch_sizes.observe(len(decoded.x))
            self.metrics.latency.observe(time.perf_counter() - started)
        return codec.encode(self.server.model, decoded, logits, predictions, loaded, request_id)

    async def read(self, request: Request, limit: int) -> bytes:
        try:
            return await read_body(request, limit)
        except BodyTooLarge as exc:
            raise Refused(f"{exc}: at most {self.max_batch} examples per request", 413, "too_large") from None

    async def decode_and_run(self, codec: Codec, raw: bytes, request: Request, served: Any,
                             request_id: str) -> tuple[Decoded, np.ndarray, RegisteredModel]:
        """The decoded request, its logits and the version that gave them. A cheap body parses faster on the event
        loop than a thread hop; a large one is parsed off it, by the inference thread that then runs it (one hop,
        its rows still in that core's cache), unless its batch waits for others or a rollout runs it twice."""
        loaded = served.loaded
        try:
            if codec.inline(raw, request, loaded):
                decoded = codec.decode(raw, request, loaded, self.max_batch)
            elif self.batch_delay_ms is None and not self.rolling_out():
                return await off_loop(self._decode_then_run, codec, raw, request, loaded)
            else:
                decoded = await off_loop(codec.decode, raw, request, loaded, self.max_batch)
        except BadInput as exc:
            message = str(exc)
            raise Refused(message, exc.status, "bad_json" if "not valid JSON" in message else "bad_input") from None
        logits, loaded = await self.run(served, decoded.x, request_id)
        return decoded, logits, loaded

    def _decode_then_run(self, codec: Codec, raw: bytes, request: Request,
                         loaded: RegisteredModel) -> tuple[Decoded, np.ndarray, RegisteredModel]:
        decoded = codec.decode(raw, request, loaded, self.max_batch)
        return decoded, self.runner(loaded)(decoded.x), loaded

    def rolling_out(self) -> bool:
        """A rollout runs: each request goes to both versions (`run`)."""
        return running_rollout(self.server) is not None

    def record(self, x: np.ndarray, predictions: np.ndarray, loaded: RegisteredModel) -> None:
        if self.inference_log is not None:
            self.inference_log.append(x, predictions, loaded.version, features=log_columns(loaded),
                                      classes=loaded.classes)

    async def run(self, served: Any, x: np.ndarray, request_id: str) -> tuple[np.ndarray, RegisteredModel]:
        """The logits for a request, and the version that gave them. During a rollout both versions see the
        request: the candidate's answer is compared (agreement, classes, errors, latency; later, labels under
        `request_id`) and returned only for its stage's share of traffic; a candidate that fails is never the
        answer, so no client sees it."""
        server = self.server
        rollout = running_rollout(server)
        if rollout is None:
            return await self.infer(served.loaded, x), served.loaded
        from triggers.serving.rollout import Observation

        candidate, view = rollout
        # both versions at once: the candidate's time overlaps the baseline's instead of adding to every request
        baseline_outcome, candidate_outcome = await asyncio.gather(
            timed(self.infer(served.loaded, x)), timed(self.infer(candidate.loaded, x)), return_exceptions=True)
        if isinstance(baseline_outcome, BaseException):   # the version clients rely on: its failure is theirs
            raise baseline_outcome
        baseline, base_seconds = baseline_outcome
        if isinstance(candidate_outcome, BaseException):
            log.warning("rollout candidate failed a request",
                        extra={"error": f"{type(candidate_outcome).__name__}: {candidate_outcome}"})
            candidate_logits, cand_seconds = None, 0.0
        else:
            candidate_logits, cand_seconds = candidate_outcome
        server.tally.add(view, Observation(request_id, baseline.argmax(1),
                                           None if candidate_logits is None else candidate_logits.argmax(1),
                                           base_seconds, cand_seconds))
        if candidate_logits is not None and random.random() < view.traffic:
            return candidate_logits, candidate.loaded
        return baseline, served.loaded

    async def infer(self, loaded: RegisteredModel, x: np.ndarray) -> np.ndarray:
        """Logits for `x` from `loaded`: batched with concurrent requests when batching is on."""
        if self.batch_delay_ms is None:
            return await off_loop(self.runner(loaded), x)
        from triggers.serving.batching import DynamicBatcher

        batchers, server = self.batchers, self.server
        batcher = batchers.get(id(loaded))
        if batcher is None:   # a version no longer served (nor rolled out) has its batcher end after its last batch
            live = {id(s.loaded) for s in (server.current, server.candidate) if s is not None} | {id(loaded)}
            for key in [key for key in batchers if key not in live]:
                batchers.pop(key).close()
            batcher = batchers[id(loaded)] = DynamicBatcher(self.runner(loaded), self.max_batch, self.batch_delay_ms)
        return await batcher.infer(x)

    def runner(self, loaded: RegisteredModel) -> Callable[[np.ndarray], np.ndarray]:
        """The call an inference thread makes for a batch: the model, and during a rollout what it cost."""
        server, clock, batches = self.server, self.clock, self.metrics.inference_batches

        def run(batch: np.ndarray) -> np.ndarray:
            batches.observe(len(batch))
            started = clock()
            # a text model's tokenizer runs here, per version: a rollout's candidate may have its own
            logits = predict(loaded.predictor, loaded.network_input(batch))
            rollout = running_rollout(server)
            if rollout is not None:   # what each version costs
                candidate, view = rollout
                server.tally.add_cost(view, loaded is candidate.loaded, clock() - started, len(batch))
            return logits
        return run
