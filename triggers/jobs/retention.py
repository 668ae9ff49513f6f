"""Retention: what the service keeps, it keeps for `service.retention_days`.

Ended jobs (with their logs and reports), planned deliveries, drift events, settled promotion intents
and posted statuses older than that are pruned. Never pruned: active jobs, deliveries still waiting
to be planned, and the promotion audit trail (`promotions`), which is the registry's history.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from automation.promote import PromotionIntent
from triggers.github.job_status import OwedStatus
from triggers.intake.deliveries import Delivery, PullRequestHead, SeenBody
from triggers.drift.events import DriftRecord
from triggers.jobs.queue import FINAL_STATES, Job, JobAttempt

log = logging.getLogger(__name__)
BATCH = 500   # rows per statement: a first prune of a long history never holds a long transaction


def prune(engine: Engine, workdir: Path, days: float, now: datetime | None = None) -> dict[str, int]:
    """Delete what is older than `days`; returns how many of each."""
    cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=days)
    pruned = {"jobs": 0}
    while True:
        with Session(engine) as session, session.begin():
            ids = list(session.scalars(select(Job.id).where(Job.state.in_(FINAL_STATES), Job.finished_at < cutoff)
                                       .limit(BATCH)))
            if not ids:
                break
            session.execute(delete(OwedStatus).where(OwedStatus.job_id.in_(ids)))
            session.execute(delete(JobAttempt).where(JobAttempt.job_id.in_(ids)))
            session.execute(delete(Job).where(Job.id.in_(ids)))
        for job_id in ids:   # the job's log, report and variants: under the service's own workdir, by id
            for folder in ("jobs", "reports"):
                shutil.rmtree(workdir / folder / job_id, ignore_errors=True)
        pruned["jobs"] += len(ids)
    for name, table, condition in (
            ("deliveries", Delivery, (Delivery.received_at < cutoff) & (Delivery.status != "pending")),
            ("seen_bodies", SeenBody, SeenBody.seen_at < cutoff),
            ("pull_request_heads", PullRequestHead, PullRequestHead.recorded_at < cutoff),
            ("drift_events", DriftRecord, DriftRecord.received_at < cutoff),
            ("promotion_intents", PromotionIntent,
             (PromotionIntent.created_at < cutoff) & (PromotionIntent.state != "moving"))):
        with Session(engine) as session, session.begin():
            pruned[name] = session.execute(delete(table).where(condition)).rowcount
    if any(pruned.values()):
        log.info("pruned", extra={"older_than_days": days, **pruned})
    return pruned
