"""A serving process's Prometheus metrics (`GET /metrics`): requests, batches, errors, the version served and a
running rollout's comparison. One registry per app, so two apps in one process (tests) never share counts."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.inference_batches = Histogram("mlgate_inference_batch_examples", "Examples per model call (a dynamic "
                                           "batch joins requests)", registry=registry, buckets=BATCH_BUCKETS)
        self.latency = Histogram("mlgate_predict_seconds", "POST /predict latency", registry=registry,
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
        self.batch_sizes = Histogram("mlgate_predict_batch_size", "Examples per request", registry=registry,
                                     buckets=BATCH_BUCKETS)
        self.errors = Counter("mlgate_predict_errors", "Refused or failed requests", ["reason"], registry=registry)
        self.version_served = Gauge("mlgate_serving_version", "Registry version being served", ["model"],
                                    registry=registry)
        self.gpu_memory = Gauge("mlgate_gpu_memory_bytes", "CUDA memory allocated by this process", registry=registry)
        self.rollout_traffic = Gauge("mlgate_rollout_traffic", "Share of requests the rolling-out version answers",
                                     ["model"], registry=registry)
        self.rollout_stage = Gauge("mlgate_rollout_stage", "Stage of the running rollout (-1: none)", ["model"],
                                   registry=registry)
        self.rollout_agreement = Gauge("mlgate_rollout_agreement", "Share of examples both versions predict alike, "
                                       "this stage", ["model"], registry=registry)
        self.rollout_latency = Gauge("mlgate_rollout_latency_seconds", "Latency quantiles of each version, this "
                                     "stage", ["model", "version", "quantile"], registry=registry)
        self.rollout_accuracy = Gauge("mlgate_rollout_accuracy", "Accuracy of each version on the labelled "
                                      "examples (POST /feedback)", ["model", "version"], registry=registry)

    def exposition(self, server: Any) -> bytes:
        """The gauges set from the server's state now, then everything in Prometheus' text format."""
        from prometheus_client import generate_latest

        model = server.model
        if server.current is not None:
            self.version_served.labels(model).set(float(server.current.loaded.version))
        rollout = server.rollout
        self.rollout_traffic.labels(model).set(0.0 if rollout is None else rollout.traffic)
        self.rollout_stage.labels(model).set(-1 if rollout is None else rollout.stage)
        live = rollout.comparison if rollout is not None else {}
        agreement = live.get("agreement")
        self.rollout_agreement.labels(model).set(float("nan") if agreement is None else agreement)
        for who, name in (("base", "baseline"), ("cand", "candidate")):
            for q in ("95", "99"):
                milliseconds = (live.get("latency") or {}).get(f"{who}_p{q}_ms")
                self.rollout_latency.labels(model, name, f"0.{q}").set(
                    float("nan") if milliseconds is None else milliseconds / 1000)
            self.rollout_accuracy.labels(model, name).set((live.get("accuracy") or {}).get(name, float("nan")))
        try:
            import torch

            if torch.cuda.is_available():
                self.gpu_memory.set(torch.cuda.memory_allocated())
        except ImportError:
            pass
        return generate_latest(self.registry)


router = APIRouter()


@router.get("/metrics")
def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    plane = request.app.state.plane
    return Response(plane.metrics.exposition(plane.server), media_type=CONTENT_TYPE_LATEST)
