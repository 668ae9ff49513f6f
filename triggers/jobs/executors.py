"""Where a job runs. `local`: `mlgate run` in a subprocess here, logs captured. `github` (github_executor.py): the
GPU-runner workflow, dispatched with PyGithub and tracked until the runner reports back.

An executor returns the outcome, or None when the job was finished by someone else (cancelled,
recovered after a lost lease, or reported by the runner itself).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Engine

from automation.checkpoint import Preempted
from automation.config import MlgateConfig
from automation.progress import PROGRESS_FILE, ProgressFile
from automation.summary import CostSummary, JobSummary
from triggers.jobs import queue
from triggers.jobs.job_end import Outcome, copy_report, finish_job, outcome_from_summary, report_path
from triggers.jobs.queue import Job

if TYPE_CHECKING:
    from triggers.jobs.child import Child
    from triggers.jobs.sandbox import Limits, PidsCgroup

log = logging.getLogger(__name__)
__all__ = ["Executor", "Finished", "LocalExecutor", "Outcome", "outcome_from_summary", "run_arguments"]


class Executor(Protocol):
    def run(self, job: Job, lost: threading.Event) -> Outcome | None: ...


@dataclass
class Finished:
    """What the trusted side saw of a job's process, never what the process said of itself."""
    exit_code: int
    stopped: bool                        # the service sent the stop (cancel, time-out, preemption)
    last_line: str | None                # stdout's last line: read from trusted code only
    error: str | None                    # the log's last `Error:` line (or the limit that ended it)
    cost: dict[str, float]               # wall and CPU seconds, peak RSS: from wait4


def run_arguments(job: Job, sha: str | None = None, engine: Engine | None = None) -> list[str]:
    """`mlgate run` arguments for a job record run by the local executor: `--attempt` fences its
    promotion to this attempt's lease, in the job database it shares with the service."""
    args = ["--model", job.model, "--trigger", job.trigger if job.trigger in ("push", "pr", "drift") else "manual",
            "--job-id", job.id, "--attempt", str(job.attempts)]
    earlier = [a for a in queue.attempts(engine, job.id) if a.attempt < job.attempts] if engine is not None else []
    if earlier:
        seconds = sum(a.as_dict()["seconds"] or 0.0 for a in earlier)
        args += ["--earlier-attempts", f"{len(earlier)},{sum(a.state == 'preempted' for a in earlier)},{seconds:.1f}"]
    if sha or job.sha:
        args += ["--sha", sha or job.sha]
    if job.pr is not None and job.trigger == "pr":
        args += ["--pr", str(job.pr)]
    data_ref = json.loads(job.payload or "{}").get("data_ref")
    if data_ref:
        args += ["--extra-train", data_ref.removeprefix("file://")]
    return args


class LocalExecutor:
    """Runs a job on this machine, on the commit it names: `mlgate run` inside a worktree at that SHA
    (triggers/jobs/checkout.py), with that commit's mlgate.yaml and code. Every job's environment is built
    from an allow-list (triggers/jobs/sandbox.py).

    A retrain (push, drift, manual) runs the default branch's code with the service's state. A PR job gets
    none of it: it runs in a bubblewrap sandbox with its own workdir, no credential, no network, and
    production as a snapshot this trusted side exported. A writer's PR judges itself, as on a push. An
    outsider's PR only trains and exports its model as ONNX; the base branch's code then judges that
    artifact, in a second sandbox, with the base branch's test split and gates (automation/candidate.py).
    """

    def __init__(self, config: MlgateConfig, config_path: str | None, engine: Engine | None = None) -> None:
        self.config, self.config_path = config, config_path
        self._store_ready = False
        self._engine = engine

    @property
    def engine(self) -> Engine:
        """The job database, where a running job's progress goes."""
        if self._engine is None:
            from automation import store

            self._engine = store.open_store(store.database_url(self.config.workdir))
        return self._engine

    def _prepare_store(self) -> None:
        """Create (migrate) the MLflow store here, once, before any job: a job killed while MLflow migrates
        its embedded SQLite store would leave it half-migrated for every job after it."""
        if not self._store_ready:
            from automation import tracking

            tracking.connect(self.config.workdir, self.config.experiment)
            self._store_ready = True

    def run(self, job: Job, lost: threading.Event) -> Outcome | None:
        from triggers.jobs.checkout import CheckoutFailed, repository_root, resolve_commit, worktree

        self._prepare_store()

        log_path = self.config.workdir / "jobs" / job.id / "job.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        config_file = Path(self.config_path or "mlgate.yaml").resolve()
        if self.config.service.checkout == "in_place":
            return self._ended(job, self._run_in(config_file.parent, config_file, job, job.sha, log_path, lost))
        try:
            repo = repository_root(config_file.parent)
            sha = resolve_commit(repo, job.sha, self.config.service.branch)
            with worktree(repo, sha, self.config.workdir / "worktrees" / job.id) as tree:
                outcome = self._run_in(tree, tree / config_file.relative_to(repo), job, sha, log_path, lost)
        except CheckoutFailed as exc:
            return Outcome("failed", {"error": str(exc)[:2000]})
        if outcome is not None:
            outcome.fields["sha"] = sha   # what ran, also for jobs that named no commit
        return self._ended(job, outcome)

    def _ended(self, job: Job, outcome: Outcome | None) -> Outcome | None:
        if outcome is not None and outcome.state != "preempted":   # ended: no attempt will resume from them
            shutil.rmtree(self.config.workdir / "jobs" / job.id / "checkpoints", ignore_errors=True)
        return outcome

    def _run_in(self, tree: Path, config_file: Path, job: Job, sha: str | None, log_path: Path,
                lost: threading.Event) -> Outcome | None:
        from triggers.jobs.sandbox import job_environment

        if job.trigger == "pr":
            return self._run_pr(tree, config_file, job, sha, log_path, lost)
        workdir = self.config.workdir   # the service's registry, job DB and reports
        env = job_environment(True, self.config.service.job_env, {"MLGATE_WORKDIR": str(workdir)})
        command = [sys.executable, "-m", "triggers.cli", "--config", str(config_file), "run",
                   *run_arguments(job, sha, self.engine), "--json"]
        finished = self._launch(command, tree, env, job, sha, log_path, lost, workdir)
        return None if finished is None else self._trusted_end(finished, job, workdir)

    def _run_pr(self, tree: Path, config_file: Path, job: Job, sha: str | None, log_path: Path,
                lost: threading.Event) -> Outcome | None:
        """A PR job, sandboxed: judged by itself (a writer's) or by the base branch's code (anyone else's)."""
        from triggers.jobs.sandbox import SandboxUnavailable, bubblewrap

        try:
            bubblewrap()
        except SandboxUnavailable as exc:   # fail closed: PR code never runs unsandboxed
            return Outcome("failed", {"error": exc.format()})
        workdir = self._isolate(job)
        snapshot = workdir / "production-snapshot"
        try:
            args = [*run_arguments(job, sha, self.engine), "--production-dir", str(snapshot), "--json"]
            if json.loads(job.payload or "{}").get("author_writes") is True:
                ran = self._sandboxed(tree, config_file, args, [snapshot], workdir / "run", job, sha, log_path, lost)
                return None if ran is None else self._trusted_end(ran, job, workdir / "run")
            return self._build_and_judge(tree, config_file, args, workdir, job, sha, log_path, lost)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _build_and_judge(self, tree: Path, config_file: Path, args: list[str], workdir: Path, job: Job,
                         sha: str | None, log_path: Path, lost: threading.Event) -> Outcome | None:
        """An outsider's PR: its code builds a candidate; only the candidate's files cross (boundary.py); the
        base branch's code judges them and owns the verdict, the report and the cost. The build's exit code,
        output and any other file it leaves are never read."""
        from triggers.jobs.boundary import NoCandidate, take_candidate

        build_dir = workdir / "build"
        built = self._sandboxed(tree, config_file, [*run_arguments(job, sha, self.engine), "--export-candidate",
                                                    str(build_dir / "candidate"), "--json"], [], build_dir, job,
                                sha, log_path, lost, progress=False)
        if built is None:
            return None
        if built.stopped:   # the service stopped it: the next attempt builds again
            return Outcome("preempted", {"error": "stopped while building the candidate"})
        try:
            candidate = take_candidate(build_dir, "candidate", workdir / "candidate")
        except NoCandidate as exc:   # its exit code, its `Error:` line and its log tail are its own claims
            return finish_job(self.engine, self.config.workdir, job.id, Outcome("failed", {
                "error": f"failed: {exc}; the build's own output is not repeated here (the service keeps it in "
                         f"the job's log): `mlgate check {job.model}` on the branch shows a broken contract"[:2000]}),
                None)
        judged = self._judge(candidate, workdir / "production-snapshot", args, workdir / "judge", job, sha,
                             log_path, lost)
        return None if judged is None else self._trusted_end(judged, job, workdir / "judge", build_cost=built.cost)

    def _judge(self, candidate: Path, snapshot: Path, args: list[str], workdir: Path, job: Job, sha: str | None,
               log_path: Path, lost: threading.Event) -> Finished | None:
        """The base branch's mlgate, in its own worktree and sandbox, judges the candidate folder."""
        from triggers.jobs.checkout import repository_root, resolve_commit, worktree

        config_file = Path(self.config_path or "mlgate.yaml").resolve()
        judge_args, mounts = [*args, "--judge", str(candidate)], [candidate, snapshot]
        held_out_dir = self.config.service.held_out_dir
        held_out = (held_out_dir / f"{job.model}.npz").resolve() if held_out_dir is not None else None
        if held_out is not None and held_out.is_file():   # the judge's alone: the build never had it mounted
            judge_args, mounts = [*judge_args, "--held-out", str(held_out)], [*mounts, held_out]
        elif held_out is not None:   # judged on the public test split, and its summary says so
            log.warning("no held-out set for this model", extra={"job_id": job.id, "path": str(held_out)})
        if self.config.service.checkout == "in_place":   # no git: the service's own tree is the base
            return self._sandboxed(config_file.parent, config_file, judge_args, mounts, workdir,
                                   job, sha, log_path, lost)
        repo = repository_root(config_file.parent)
        base = resolve_commit(repo, None, self.config.service.branch)
        with worktree(repo, base, self.config.workdir / "worktrees" / f"{job.id}-judge") as tree:
            return self._sandboxed(tree, tree / config_file.relative_to(repo), judge_args, mounts,
                                   workdir, job, sha, log_path, lost)

    def _sandboxed(self, tree: Path, config_file: Path, args: list[str], read_only: list[Path], workdir: Path,
                   job: Job, sha: str | None, log_path: Path, lost: threading.Event,
                   progress: bool = True) -> Finished | None:
        """`progress`: read the job's progress file; never for an outsider's build, whose every file but the
        candidate stays on its side (its epochs and accuracy would be claims on the check run)."""
        from triggers.jobs.sandbox import Limits, job_environment, sandboxed

        workdir.mkdir(parents=True, exist_ok=True)
        if not (workdir / "mlflow.db").exists():   # its private store: a copy, not seconds of migrations per job
            from automation.tracking import empty_store

            shutil.copyfile(empty_store(self.config.workdir), workdir / "mlflow.db")
        extra = [Path(p) for p in self.config.service.sandbox_read_only if Path(p).exists()]
        limits = Limits.resolve(self.config.service.sandbox_limits, self.config.service.job_timeout_minutes)
        env = job_environment(False, set_to={"MLGATE_WORKDIR": str(workdir)})
        command = sandboxed([sys.executable, "-m", "triggers.cli", "--config", str(config_file), "run", *args],
                            cwd=tree, writable=workdir, read_only=[*read_only, *extra], env=env, tmp_mb=limits.tmp_mb)
        return self._launch(command, tree, job_environment(False), job, sha, log_path, lost, workdir, limits,
                            progress)

    def _isolate(self, job: Job) -> Path:
        """A PR job's own workdir, holding production as a snapshot exported here (the trusted side)."""
        from automation import tracking
        from automation.production import export_production

        workdir = self.config.workdir / "isolated" / job.id
        shutil.rmtree(workdir, ignore_errors=True)
        client, _ = tracking.connect(self.config.workdir, self.config.experiment)
        export_production(client, job.model, workdir / "production-snapshot")
        return workdir

    def _launch(self, command: list[str], tree: Path, env: dict[str, str], job: Job, sha: str | None,
                log_path: Path, lost: threading.Event, workdir: Path, limits: Limits | None = None,
                progress: bool = True) -> Finished | None:
        """Run one process to its end; None when it was abandoned (no longer this worker's job). Its output goes
        to the job log, bounded; a sandboxed one runs under `limits`, its workdir measured as it runs."""
        from triggers.jobs.child import Child
        from triggers.jobs.job_log import JobLog, last_line
        from triggers.jobs.sandbox import PidsCgroup, workdir_bytes

        log.info("job started", extra={"job_id": job.id, "model": job.model, "sha": sha, "log": str(log_path)})
        cgroup = PidsCgroup.make(f"{job.id}-{os.getpid()}", limits.processes) if limits is not None else None
        stopped, over_quota, next_measure, too_many = False, None, time.monotonic(), False
        try:
            # cwd: `python -m` puts the worktree first on sys.path, so the commit's own code is what runs
            with JobLog(log_path) as job_log:
                child = Child(command, cwd=tree, env=env, log=job_log,
                              preexec=functools.partial(_prepare_child, limits, cgroup))
                progress_file = ProgressFile(workdir / "jobs" / job.id / PROGRESS_FILE) if progress else None
                while child.poll() is None:
                    if lost.wait(0.5):
                        if self._stop(child, job, lost, sandboxed=limits is not None) != Preempted.exit_code:
                            log.warning("job abandoned: it is no longer this worker's", extra={"job_id": job.id})
                            return None
                        stopped = True   # it checkpointed: the worker requeues it (if it is still this worker's)
                        break
                    if progress_file is not None and (update := progress_file.changed()) is not None:
                        queue.record_progress(self.engine, job.id, job.attempts, update)
                    if limits is not None and time.monotonic() >= next_measure:
                        next_measure = time.monotonic() + 2.0
                        if workdir_bytes(workdir, limits.workdir_bytes) > limits.workdir_bytes:
                            over_quota = (f"its folder passed {limits.workdir_bytes // 1024 ** 2:,} MB "
                                          "(service.sandbox_limits.workdir_mb)")
                            child.signal(kill=True)
                            child.wait()
        finally:
            if cgroup is not None:
                too_many = cgroup.reached()
                cgroup.remove()
        tail = child.stderr.tail_bytes()[-8192:].decode(errors="replace")
        reason = over_quota or (limits.reason(child.exit_code or 0, tail) if limits is not None else None)
        if reason is None and too_many:
            reason = f"it reached its {limits.processes:,} processes (service.sandbox_limits.processes)"   # type: ignore[union-attr]
        error = f"stopped: {reason}" if reason else _last_error(tail)
        return Finished(child.exit_code if child.exit_code is not None else -1, stopped, last_line(child.stdout),
                        error, child.cost())

    def _trusted_end(self, finished: Finished, job: Job, workdir: Path,
                     build_cost: dict[str, float] | None = None) -> Outcome:
        """The end of a process running trusted code (a retrain, a writer's PR, or the judge): its summary is
        taken, typed; an outsider build's measured cost is added to the judge's."""
        summary = JobSummary.parse(_json_line(finished.last_line or ""))
        outcome = outcome_from_summary(finished.exit_code, summary, finished.error, stopped=finished.stopped)
        if summary is not None and build_cost is not None:
            summary = _with_build_cost(summary, build_cost)
        report = report_path(self.config.workdir, job.id)
        written = report_path(workdir, job.id)   # where the job wrote it, in its own workdir
        if written != report:
            copy_report(workdir, written, report)
        return finish_job(self.engine, self.config.workdir, job.id, outcome, summary, report)

    def _stop(self, child: Child, job: Job, lost: threading.Event, sandboxed: bool = False) -> int:
        """Cancelled, timed out or preempted: SIGTERM, as a spot notice would, so training checkpoints; SIGKILL
        once the model's grace period (and a margin) has passed. A lost lease: SIGKILL at once, before another
        worker may claim the job and resume from the same checkpoints. Returns the exit code."""
        if getattr(lost, "lease_lost", False):
            child.signal(kill=True)
            return child.wait()   # type: ignore[return-value]
        grace = self.config.model(job.model).train.preemption_grace_seconds if job.model in self.config.models \
            else 30.0
        if sandboxed:
            child.terminate_sandboxed()
        else:
            child.signal()
        code = child.wait(grace + 10)
        if code is None:
            child.signal(kill=True)
            code = child.wait()
        return code   # type: ignore[return-value]


def _with_build_cost(summary: JobSummary, build: dict[str, float]) -> JobSummary:
    """The judge's cost plus the build's, as this side measured the build's process."""
    cost = summary.cost.model_dump() if summary.cost is not None else {}
    for key in ("wall_seconds", "cpu_seconds"):
        cost[key] = (cost.get(key) or 0.0) + build.get(key, 0.0)
    cost["build"] = build | {"measured_by": "the service (wait4), not the build"}
    return summary.model_copy(update={"cost": CostSummary.model_validate(cost)})


def _prepare_child(limits: Limits | None, cgroup: PidsCgroup | None) -> None:
    """In the child, before exec: its limits and cgroup, then dying with its worker."""
    if cgroup is not None:
        cgroup.enter()
    if limits is not None:
        limits.apply()
    _die_with_parent()


def _die_with_parent() -> None:
    """Linux: the job dies with its worker, so a killed worker leaves no orphan that could still promote."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


def _json_line(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _last_error(text: str) -> str | None:
    """The one-line `Error: …` the CLI prints, from the end of the job's stderr."""
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    return errors[-1] if errors else (lines[-1] if lines else None)
