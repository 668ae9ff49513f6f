"""What the dashboard says about one model: who put production there, its last jobs and their gate
verdicts, and how accuracy and p95 latency moved across versions against the gate thresholds. Read from
the job records and the summaries the service kept (never from a path a job named)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from automation.config import MlgateConfig
from triggers.github.job_status import summary_file
from triggers.jobs.queue import Job
from triggers.serving.rollout import Rollout, stage_counts
from triggers.serving.rollout_analysis import comparison

RECENT_JOBS = 6
VERSIONS = 20


def _summary(config: MlgateConfig, job_id: str) -> dict[str, Any] | None:
    path = summary_file(config.workdir, job_id)
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except ValueError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("gate"), dict) else None


def _verdict(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    checks = summary["gate"].get("checks") or []
    return {"passed": bool(summary["gate"].get("passed")),
            "failed": [c.get("name") for c in checks if c.get("status") == "failed"]}


def _cost(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    cost = (summary or {}).get("cost")
    if not isinstance(cost, dict):
        return None
    gpu = cost.get("gpu") if isinstance(cost.get("gpu"), dict) else {}
    return {"wall_seconds": cost.get("wall_seconds"), "cpu_seconds": cost.get("cpu_seconds"),
            "gpu_seconds": gpu.get("seconds"), "gpu_energy_joules": gpu.get("energy_joules")}


def model_overview(engine: Engine, config: MlgateConfig, model: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    with Session(engine) as session:
        recent = list(session.scalars(select(Job).where(Job.model == model)
                                      .order_by(Job.created_at.desc(), Job.id).limit(RECENT_JOBS)))
        registered = list(session.scalars(select(Job).where(Job.model == model, Job.version.is_not(None))
                                          .order_by(Job.finished_at.desc()).limit(VERSIONS)))
    jobs = []
    for job in recent:
        summary = _summary(config, job.id) if job.state in ("succeeded", "gate_failed", "gate_stale") else None
        jobs.append({"id": job.id, "state": job.state, "trigger": job.trigger, "sha": job.sha, "pr": job.pr,
                     "version": job.version, "created_at": job.as_dict()["created_at"], "error": job.error,
                     "report": job.report_path is not None, "gate": _verdict(summary), "cost": _cost(summary)})
    versions = []
    for job in registered:
        summary = _summary(config, job.id)
        if summary is None:
            continue
        metrics = summary.get("metrics") or {}
        p95 = ((metrics.get("latency") or {}).get("1") or {}).get("p95_ms")
        versions.append({"version": job.version, "job": job.id, "accuracy": metrics.get("accuracy"), "p95_ms": p95,
                         "gate_passed": bool(summary["gate"].get("passed"))})
    versions.sort(key=lambda v: int(v["version"]) if str(v["version"]).isdigit() else 0)
    gates = config.model(model).gates.absolute
    rollout_config = config.model(model).rollout
    with Session(engine) as session:
        latest = session.scalars(select(Rollout).where(Rollout.model == model).order_by(Rollout.id.desc())
                                 .limit(1)).first()
        counts = {} if latest is None else stage_counts(session, latest.id, latest.stage)
    live = comparison(counts, rollout_config.confidence if rollout_config else 0.95)
    rollout = None if latest is None else {
        "candidate": latest.candidate, "baseline": latest.baseline, "stage": latest.stage, "state": latest.state,
        "reason": latest.reason, "requests": live["requests"], "agreement": live["agreement"], "live": live}
    # the latest move is what put production where it is
    return {"promoted": history[-1] if history else None, "jobs": jobs, "versions": versions, "rollout": rollout,
            "thresholds": {"min_accuracy": gates.min_accuracy, "max_p95_latency_ms": gates.max_p95_latency_ms}}
