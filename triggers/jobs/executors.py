"""Where a job runs. `local`: `mlgate run` in a subprocess here, logs captured. `github` (github_executor.py): the
GPU-runner workflow, dispatched with PyGithub and tracked until the runner reports back.

An executor returns the outcome, or None when the job was finished by someone else (cancelled,
recovered after a lost lease, or reported by the runner itself).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine

from automation.checkpoint import Preempted
from automation.config import MlgateConfig
from automation.progress import PROGRESS_FILE, ProgressFile
from triggers.github.job_status import keep_summary
from triggers.jobs import queue
from triggers.jobs.queue import Job

log = logging.getLogger(__name__)

# anything else is "failed" (triggers.cli); 75: checkpointed and stopped (automation/checkpoint.Preempted)
EXIT_STATES = {0: "succeeded", 3: "gate_failed", 4: "gate_stale", 75: "preempted"}


@dataclass
class Outcome:
    state: str
    fields: dict[str, Any] = field(default_factory=dict)   # run_id, version, error


class Executor(Protocol):
    def run(self, job: Job, lost: threading.Event) -> Outcome | None: ...


def outcome_from_summary(exit_code: int, summary: dict[str, Any] | None, error: str | None) -> Outcome:
    """The job record's state and links from `mlgate run --json`'s exit code and last line."""
    summary = summary or {}
    state = EXIT_STATES.get(exit_code, "failed")
    # the report is never located by a path the job names: the service keeps it under its own workdir
    fields = {"run_id": summary.get("run_id"), "version": summary.get("version")}
    if state in ("failed", "preempted"):
        fields["error"] = (error or f"exit code {exit_code}")[:2000]
    return Outcome(state, {k: v for k, v in fields.items() if v is not None})


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
        return self._launch(command, tree, env, job, sha, log_path, lost, workdir)

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
                return self._sandboxed(tree, config_file, args, [snapshot], workdir / "run", job, sha, log_path, lost)
            candidate = workdir / "build" / "candidate"
            built = self._sandboxed(tree, config_file, [*run_arguments(job, sha, self.engine), "--export-candidate",
                                                        str(candidate), "--json"], [], workdir / "build", job, sha,
                                    log_path, lost)
            if built is None or built.state != "succeeded":
                return built
            return self._judge(candidate, snapshot, args, workdir / "judge", job, sha, log_path, lost)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _judge(self, candidate: Path, snapshot: Path, args: list[str], workdir: Path, job: Job, sha: str | None,
               log_path: Path, lost: threading.Event) -> Outcome | None:
        """The base branch's mlgate, in its own worktree and sandbox, judges the candidate folder."""
        from triggers.jobs.checkout import repository_root, resolve_commit, worktree

        config_file = Path(self.config_path or "mlgate.yaml").resolve()
        judge_args = [*args, "--judge", str(candidate)]
        if self.config.service.checkout == "in_place":   # no git: the service's own tree is the base
            return self._sandboxed(config_file.parent, config_file, judge_args, [candidate, snapshot], workdir,
                                   job, sha, log_path, lost)
        repo = repository_root(config_file.parent)
        base = resolve_commit(repo, None, self.config.service.branch)
        with worktree(repo, base, self.config.workdir / "worktrees" / f"{job.id}-judge") as tree:
            return self._sandboxed(tree, tree / config_file.relative_to(repo), judge_args, [candidate, snapshot],
                                   workdir, job, sha, log_path, lost)

    def _sandboxed(self, tree: Path, config_file: Path, args: list[str], read_only: list[Path], workdir: Path,
                   job: Job, sha: str | None, log_path: Path, lost: threading.Event) -> Outcome | None:
        from triggers.jobs.sandbox import job_environment, sandboxed

        workdir.mkdir(parents=True, exist_ok=True)
        if not (workdir / "mlflow.db").exists():   # its private store: a copy, not seconds of migrations per job
            shutil.copyfile(self._empty_store(), workdir / "mlflow.db")
        extra = [Path(p) for p in self.config.service.sandbox_read_only if Path(p).exists()]
        env = job_environment(False, set_to={"MLGATE_WORKDIR": str(workdir)})
        command = sandboxed([sys.executable, "-m", "triggers.cli", "--config", str(config_file), "run", *args],
                            cwd=tree, writable=workdir, read_only=[*read_only, *extra], env=env)
        return self._launch(command, tree, job_environment(False), job, sha, log_path, lost, workdir)

    def _empty_store(self) -> Path:
        """An empty MLflow store, its schema migrated once per service: every sandboxed job's private store
        starts as a copy (the job's run is thrown away with its workdir; only its report comes back)."""
        path = self.config.workdir / "cache" / "empty-mlflow.db"
        if not path.exists():
            from mlflow import MlflowClient

            path.parent.mkdir(parents=True, exist_ok=True)
            building = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            uri = f"sqlite:///{building}"
            MlflowClient(uri, uri).search_experiments()   # creates and migrates it
            building.replace(path)   # atomic: a concurrent worker sees the whole file or none
        return path

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
                log_path: Path, lost: threading.Event, workdir: Path) -> Outcome | None:
        log.info("job started", extra={"job_id": job.id, "model": job.model, "sha": sha, "log": str(log_path)})
        # cwd: `python -m` puts the worktree first on sys.path, so the commit's own code is what runs
        with open(log_path, "ab") as stderr, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, cwd=tree,
                                                               env=env, preexec_fn=_die_with_parent) as process:
            stdout: list[bytes] = []
            reader = threading.Thread(target=lambda: stdout.extend(process.stdout), daemon=True)   # type: ignore[arg-type]
            reader.start()
            progress = ProgressFile(workdir / "jobs" / job.id / PROGRESS_FILE)
            while process.poll() is None:
                if lost.wait(0.5):
                    if self._stop(process, job, lost) != Preempted.exit_code:
                        log.warning("job abandoned: it is no longer this worker's", extra={"job_id": job.id})
                        return None
                    break   # it checkpointed: the worker requeues it (if it is still this worker's)
                if (update := progress.changed()) is not None:
                    queue.record_progress(self.engine, job.id, job.attempts, update)
            reader.join(10)
        lines = b"".join(stdout).decode(errors="replace").strip().splitlines()
        with open(log_path, "ab") as sink:
            sink.write(b"".join(stdout))
        summary = _json_line(lines[-1]) if lines else None
        outcome = outcome_from_summary(process.returncode, summary, _last_error(log_path))
        keep_summary(self.config.workdir, job.id, summary)
        queue.add_job_cost(self.engine, (summary or {}).get("cost"))
        report = self.config.workdir / "reports" / job.id / "report.html"   # where the service looks, always
        written = workdir / "reports" / job.id / "report.html"
        if written != report and written.is_file():
            report.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(written, report)
        if report.is_file():
            outcome.fields["report_path"] = str(report)
        return outcome

    def _stop(self, process: subprocess.Popen, job: Job, lost: threading.Event) -> int:
        """Cancelled, timed out or preempted: SIGTERM, as a spot notice would, so training checkpoints; SIGKILL
        once the model's grace period (and a margin) has passed. A lost lease: SIGKILL at once, before another
        worker may claim the job and resume from the same checkpoints. Returns the exit code."""
        if getattr(lost, "lease_lost", False):
            process.kill()
            return process.wait()
        grace = self.config.model(job.model).train.preemption_grace_seconds if job.model in self.config.models \
            else 30.0
        process.terminate()
        try:
            return process.wait(grace + 10)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()


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


def _last_error(log_path: Path) -> str | None:
    """The one-line `Error: …` the CLI prints, from the job log."""
    lines = log_path.read_text(errors="replace").splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    return errors[-1] if errors else (lines[-1] if lines else None)
