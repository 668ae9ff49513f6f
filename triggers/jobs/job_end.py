"""How a job's attempt ends, in one place for every executor: the local one (a process here) and the runner's
callback (`POST /jobs/{id}/result`).

The rules live here: a state comes from a trusted process's exit code; a summary is kept only when the caller
vouches for it (a trusted job's own, or the judge's: never an outsider's build); an exit code 75 is a
preemption only when the trusted side stopped the job; cost goes to /metrics only from a typed summary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from automation.summary import JobSummary
from triggers.github.job_status import keep_summary
from triggers.jobs import queue

# anything else is "failed" (triggers.cli); 75: checkpointed and stopped (automation/checkpoint.Preempted)
EXIT_STATES = {0: "succeeded", 3: "gate_failed", 4: "gate_stale", 75: "preempted"}
MAX_REPORT_BYTES = 32 * 1024 * 1024


@dataclass
class Outcome:
    state: str
    fields: dict[str, Any] = field(default_factory=dict)   # run_id, version, error, report_path, sha


def outcome_from_summary(exit_code: int, summary: JobSummary | None, error: str | None,
                         stopped: bool = True) -> Outcome:
    """The job record's state and links from a trusted process's exit code and summary. `stopped`: the trusted
    side (the service or the engine) sent the stop; without it an exit 75 is a failure, not a preemption."""
    state = EXIT_STATES.get(exit_code, "failed")
    if state == "preempted" and not stopped:
        state, error = "failed", "exit code 75 (preempted), but nothing stopped the job"
    fields = {} if summary is None else {"run_id": summary.run_id, "version": summary.version}
    if state in ("failed", "preempted"):
        fields["error"] = (error or f"exit code {exit_code}")[:2000]
    return Outcome(state, {k: v for k, v in fields.items() if v is not None})


def copy_report(root: Path, source: Path, target: Path, limit: int = MAX_REPORT_BYTES) -> bool:
    """Copy a report a job wrote under its workdir `root` into the service's report folder: no link followed at
    any step below `root`, a regular file of one link, size-capped (boundary.py). False, nothing copied,
    otherwise."""
    from triggers.jobs.boundary import NoCandidate, copy_regular, open_beneath

    try:
        *folders, name = source.relative_to(root).parts
        folder_fd = open_beneath(root, tuple(folders))
    except (ValueError, OSError):
        return False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return copy_regular(folder_fd, name, limit, target)
    except (NoCandidate, OSError):
        target.unlink(missing_ok=True)
        return False
    finally:
        os.close(folder_fd)


def finish_job(engine: Engine, workdir: Path, job_id: str, outcome: Outcome, summary: JobSummary | None,
               report: Path | None = None) -> Outcome:
    """Keep what a trusted summary says (for GitHub reports and /metrics) and the report, under the service's
    own workdir at paths derived from the job id. `report` exists already where the service keeps it."""
    if summary is not None:
        keep_summary(workdir, job_id, summary.as_dict())
        if summary.cost is not None:
            queue.add_job_cost(engine, summary.cost.model_dump())
    if report is not None and report.is_file():
        outcome.fields["report_path"] = str(report)
    return outcome


def report_path(workdir: Path, job_id: str) -> Path:
    """Where the service keeps a job's HTML report: derived from the job id, nothing else."""
    return workdir / "reports" / job_id / "report.html"
