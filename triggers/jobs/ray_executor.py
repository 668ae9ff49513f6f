"""The `ray` executor: each attempt of a job is one Ray job submission (`ray.job_submission.JobSubmissionClient`),
`mlgate run` on a Ray node, which posts its result back (`POST /jobs/{id}/result`, triggers/jobs/remote.py).

- **Idempotent.** A submission's id is `mlgate-<job>-a<attempt>` (`-build`, `-judge` for an outsider's PR). Ray
  refuses a reused id: that means the submission is there already, and the executor re-attaches to it. Before
  submitting for attempt n it looks for a submission of an earlier attempt that is still PENDING or RUNNING (a
  service killed mid-job, then restarted): it adopts that runner (`queue.adopt_runner`, whose credential then
  reports for attempt n) and waits on it, so a restart never trains twice.
- **What ships.** The commit's tree, as the submission's `working_dir`: copied first with directories and
  regular files only (Ray's packaging follows links, so a link in a commit would ship a file of the service's
  machine), without `.git` and `.mlgate`.
- **Trusted runs** (push, drift, manual; a writer's PR; the judge) get their result credential in the
  submission's `env_vars`, and a retrain the registry's variables, so it promotes into the service's registry.
  Anything that can reach the Ray dashboard can read every submission's `env_vars`: no outsider's code may.
- **An outsider's PR** is built by a submission with no credential whose working_dir holds only an archive of
  the PR's tree: Ray puts a working_dir first on the Python path of the processes it starts for a submission (its
  supervisor actor included), so the PR's tree itself would run a `sitecustomize.py` it carries, outside any
  sandbox. The entrypoint is this module, run with `python -I` (no working_dir, no PYTHONPATH on its path): it
  unpacks the tree on the node and runs the build in the bubblewrap sandbox (no network, so no dashboard; an
  empty environment), which exports the candidate into the exchange folder the service and the nodes share.
  The service takes the candidate (boundary.py) and submits the judge: the base branch's code, `--judge`. The
  build's exit code and output are never read for the verdict (its log goes to the job's log, bounded).
- **Cancel** (and the job's time-out) stops the submission: SIGTERM, and Ray's SIGKILL only after the model's
  `train.preemption_grace_seconds` and a margin (RAY_JOB_STOP_WAIT_TIME_S, set per submission: Ray's JobSupervisor
  reads it from the env_vars it is given; its default of 3 s is too short to write a checkpoint). A service that
  stops (or loses the job's lease) leaves the submission running for the next attempt to re-attach to.
- **Ends.** The runner's report ends the job. A submission that ends without one fails the job with Ray's own
  account (status, exit code, message; never the log tail Ray's message carries).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shlex
import shutil
import stat
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from automation.config import MlgateConfig
from automation.errors import MlgateError, UsageError
from triggers.jobs import queue
from triggers.jobs.job_end import Outcome
from triggers.jobs.queue import Job
from triggers.jobs.remote import Role, RunnerEnd, outsider_pr, result_token, runner_arguments, wait_for_report

log = logging.getLogger(__name__)

ACTIVE = ("PENDING", "RUNNING")
STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"   # read by Ray's JobSupervisor (job_supervisor.py), in whole seconds
EXCLUDED = (".git", ".mlgate")    # never shipped: the repository's objects, a local state folder
TREE_ARCHIVE = "tree.tar"          # an outsider's tree, packed: nothing in a build's working_dir is importable
REPORT_GRACE_SECONDS = 10.0        # a runner that ended SUCCEEDED may still be posting its result
WARN_EVERY_SECONDS = 60.0          # a dashboard outage while polling: one warning a minute per submission
_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(m|k|Ki|Mi|Gi|Ti|M|G|T)?")
_UNITS = {"": 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 2.0 ** 10, "Mi": 2.0 ** 20, "Gi": 2.0 ** 30, "Ti": 2.0 ** 40}


class RayUnavailable(MlgateError):
    """The Ray dashboard did not answer a call that cannot wait (a submission)."""


def submission_id(job_id: str, attempt: int, stage: str = "") -> str:
    """Deterministic: the same attempt's submission always has the same id, which Ray never runs twice."""
    return f"mlgate-{job_id}-a{attempt}" + (f"-{stage}" if stage else "")


def memory_bytes(quantity: str) -> int:
    """A Kubernetes quantity (`8Gi`, `512M`, `1.5G`) in bytes, as Ray's `entrypoint_memory` takes it."""
    match = _QUANTITY.fullmatch(quantity)
    if match is None:
        raise UsageError(f"resources.memory {quantity!r} is not a quantity such as 8Gi or 512M")
    return int(float(match[1]) * _UNITS[match[2] or ""])


def ray_reason(sid: str, info: Any) -> str:
    """Ray's own account of how a submission ended, in one line: its status, exit code and message (the message's
    log tail is cut off: for an outsider's build that is the build's output)."""
    message = (info.message or "").split(", last available logs")[0].strip().splitlines()
    code = f", exit code {info.driver_exit_code}" if getattr(info, "driver_exit_code", None) is not None else ""
    said = f": {message[0]}" if message else ""
    return f"the Ray job {sid} ended {info.status}{code} without reporting a result{said}"[:2000]


def stage_tree(tree: Path, dest: Path, leave_out: tuple[Path, ...] = ()) -> list[str]:
    """Copy `tree` into `dest` as Ray may ship it: folders and regular files only, without .git, .mlgate and
    `leave_out`. Ray's packaging follows links (a link's target is what it zips), so `leak -> /proc/self/environ`
    in a commit would ship the service's environment: a link to a regular file inside the tree is copied as that
    file, any other link is left out. Returns the relative paths left out."""
    root = tree.resolve()
    # only what lies inside the tree (the service's own workdir, for `checkout: in_place`): a worktree lies
    # inside the workdir, and would otherwise leave itself out
    leave_out = tuple(p for p in leave_out if p != root and p.is_relative_to(root))
    left_out: list[str] = []
    for folder, dirs, files in os.walk(root):   # a linked folder is listed in `dirs`, never entered
        here = Path(folder)
        relative = here.relative_to(root)
        (dest / relative).mkdir(parents=True, exist_ok=True)
        kept = []
        for name in dirs:
            path = here / name
            if _excluded(path, root, leave_out):
                continue
            if path.is_symlink():
                left_out.append(str(relative / name))
                continue
            kept.append(name)
        dirs[:] = kept
        for name in files:
            path = here / name
            if _excluded(path, root, leave_out):
                continue
            source = _regular_inside(path, root, leave_out)
            if source is None:
                left_out.append(str(relative / name))
                continue
            shutil.copy2(source, dest / relative / name)
    return left_out


def _excluded(path: Path, root: Path, leave_out: tuple[Path, ...]) -> bool:
    relative = path.relative_to(root)
    return relative.parts[0] in EXCLUDED or any(path == p or path.is_relative_to(p) for p in leave_out)


def _regular_inside(path: Path, root: Path, leave_out: tuple[Path, ...]) -> Path | None:
    """The regular file `path` stands for inside `root` (itself, or a link's target there), else None."""
    mode = os.lstat(path).st_mode
    if stat.S_ISREG(mode):
        return path
    if not stat.S_ISLNK(mode):
        return None
    target = path.resolve()
    try:
        regular = stat.S_ISREG(os.stat(target).st_mode)
    except OSError:
        return None
    if not regular or not target.is_relative_to(root) or _excluded(target, root, leave_out):
        return None
    return target


@dataclass
class Spec:
    """One submission's content, but its id."""
    entrypoint: str
    working_dir: Path
    env_vars: dict[str, str]
    metadata: dict[str, str]


SpecMaker = Callable[[], AbstractContextManager[Spec]]   # a Spec, valid while its context is open (its files)


@dataclass
class Runner:
    """A submission the attempt waits on: its id, and the attempt it was submitted for (an earlier one when the
    attempt re-attached)."""
    id: str
    attempt: int


class RayExecutor:
    """Runs each attempt as a Ray job submission and waits for the runner's report; see the module's doc."""

    def __init__(self, config: MlgateConfig, config_path: str | None, engine: Engine, client: Any = None) -> None:
        self.config, self.config_path, self.engine = config, config_path, engine
        self.settings = config.service.ray
        self._client = client
        self._client_lock = threading.Lock()
        self._warned: dict[str, float] = {}   # submission id → when its last polling warning was logged

    @property
    def client(self) -> Any:
        """The dashboard's job API, connected on first use (the constructor calls the dashboard)."""
        with self._client_lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                try:
                    self._client = JobSubmissionClient(self.settings.address)
                except Exception as exc:   # requests' ConnectionError, or Ray's version check
                    raise RayUnavailable(f"the Ray dashboard at {self.settings.address} did not answer: "
                                         f"{_one_line(exc)}", hint="check service.ray.address") from None
            return self._client

    # --- one job ---------------------------------------------------------------------------------------------

    def run(self, job: Job, lost: threading.Event) -> Outcome | None:
        from triggers.jobs.checkout import CheckoutFailed

        self.log_path(job).parent.mkdir(parents=True, exist_ok=True)
        try:
            outcome = self._build_and_judge(job, lost) if outsider_pr(job) else self._single(job, lost)
        except CheckoutFailed as exc:
            outcome = Outcome("failed", {"error": str(exc)[:2000]})
        except MlgateError as exc:   # no sandbox, no credential to mint, Ray not answering: in its own words
            outcome = Outcome("failed", {"error": exc.format()[:2000]})
        current = queue.get_job(self.engine, job.id)
        if outcome is not None or current is None or current.state in queue.FINAL_STATES:
            shutil.rmtree(self._exchange(job), ignore_errors=True)   # over: no attempt will need its folders
        return outcome

    def _nodes(self, job: Job) -> int:
        """Machines a trusted run trains on (train.nodes); an outsider's build and the judge use one."""
        return self.config.model(job.model).train.nodes if job.model in self.config.models else 1

    def _single(self, job: Job, lost: threading.Event) -> Outcome | None:
        """A retrain or a writer's PR: one runner that reports itself."""
        runner = self._start(job, "", lambda: self._runner_spec(job))
        return self._await_report(job, runner, lost)

    def _build_and_judge(self, job: Job, lost: threading.Event) -> Outcome | None:
        """An outsider's PR: its code builds a candidate, sandboxed and without a credential; only the candidate's
        files cross (boundary.py); the base branch's code judges them and reports."""
        from triggers.jobs.boundary import NoCandidate, take_candidate

        judging = self._earlier_running(job, "judge")
        if judging is not None:   # the earlier attempt got as far as its judge: wait on that one
            return self._await_report(job, self._adopt(job, "judge", judging), lost)
        build = self._start(job, "build", lambda: self._build_spec(job))
        with self._follow(job, build) as follow:
            info = self._await_end(job, follow, lost)
            if info is None:
                return self._let_go(job, build)
        judge_dir = self._exchange(job) / f"a{job.attempts}-judge"
        shutil.rmtree(judge_dir, ignore_errors=True)
        judge_dir.mkdir(parents=True)
        try:
            take_candidate(self._build_dir(job, build.attempt), "candidate", judge_dir / "candidate")
        except NoCandidate as exc:   # its exit code, its output and its log tail are its own claims
            return Outcome("failed", {"error": f"failed: {exc}; the build's own output is not repeated here (the "
                                               f"service keeps it in the job's log): `mlgate check {job.model}` "
                                               "on the branch shows a broken contract"[:2000]})
        log.info("candidate taken", extra={"job_id": job.id, "build": build.id, "build_status": str(info.status)})
        judge = self._submit(job, submission_id(job.id, job.attempts, "judge"), self._judge_spec(job, judge_dir))
        return self._await_report(job, judge, lost)

    # --- submissions -----------------------------------------------------------------------------------------

    def _start(self, job: Job, stage: str, spec: SpecMaker) -> Runner:
        """The runner this attempt waits on: an earlier attempt's that is still going, else a new submission."""
        earlier = self._earlier_running(job, stage)
        if earlier is not None:
            return self._adopt(job, stage, earlier)
        return self._submit(job, submission_id(job.id, job.attempts, stage), spec)

    def _earlier_running(self, job: Job, stage: str) -> int | None:
        """The newest earlier attempt whose submission for `stage` is PENDING or RUNNING."""
        for attempt in range(job.attempts - 1, 0, -1):
            info = self.info(submission_id(job.id, attempt, stage))
            if info is not None and str(info.status) in ACTIVE:
                return attempt
        return None

    def _adopt(self, job: Job, stage: str, attempt: int) -> Runner:
        if stage != "build":   # a build reports nothing: only a reporting runner's credential changes hands
            queue.adopt_runner(self.engine, job.id, job.attempts, attempt)
        sid = submission_id(job.id, attempt, stage)
        log.info("re-attached to an earlier attempt's Ray job", extra={"job_id": job.id, "attempt": job.attempts,
                                                                       "submission": sid})
        return Runner(sid, attempt)

    def _submit(self, job: Job, sid: str, spec: SpecMaker) -> Runner:
        """Submit what `spec` makes under `sid`; Ray refusing the id means it is there already: re-attach to it."""
        resources = self._resources(job)
        # several nodes: the entrypoint only places them (triggers/jobs/ray_nodes.py); each node asks for the rest
        alone = not (self._nodes(job) > 1 and not outsider_pr(job))
        with spec() as made:
            try:
                self.client.submit_job(entrypoint=made.entrypoint, submission_id=sid, metadata=made.metadata,
                                       runtime_env={"working_dir": str(made.working_dir), "env_vars": made.env_vars},
                                       entrypoint_num_cpus=resources.cpus if alone else 0,
                                       entrypoint_num_gpus=(resources.gpus or None) if alone else None,
                                       entrypoint_memory=memory_bytes(resources.memory) if alone else None)
            except RuntimeError as exc:
                if "already exists" not in str(exc):
                    raise RayUnavailable(f"Ray refused the submission {sid}: {_one_line(exc)}") from None
                log.warning("submission id in use: re-attaching to it", extra={"job_id": job.id, "submission": sid})
                return Runner(sid, job.attempts)
            except Exception as exc:   # the dashboard is down: this attempt fails, as a dispatch that fails does
                raise RayUnavailable(f"could not submit {sid} to Ray at {self.settings.address}: "
                                     f"{_one_line(exc)}") from None
        log.info("Ray job submitted", extra={"job_id": job.id, "attempt": job.attempts, "submission": sid})
        return Runner(sid, job.attempts)

    def _resources(self, job: Job) -> Any:
        from automation.config import ResourcesConfig

        # the service's config, never the commit's: a PR does not choose what it gets
        return self.config.model(job.model).resources if job.model in self.config.models else ResourcesConfig()

    @contextlib.contextmanager
    def _runner_spec(self, job: Job) -> Iterator[Spec]:
        """A runner that reports: the job's commit, with its credential; a retrain also gets the registry's
        variables and the service's workdir (it promotes there), a writer's PR a private workdir of its own."""
        with self._checkout(job, base=False) as (tree, config, sha), self._staged(job, tree) as staged:
            role: Role = "job"
            args = runner_arguments(job, role, self.settings.service_url, sha=sha)
            if job.trigger == "pr":
                env = {"MLGATE_WORKDIR": str(self._private_workdir(self._exchange(job) / "work"))}
            else:
                env = self._registry_env() | {"MLGATE_WORKDIR": str(self.config.workdir.resolve())}
            entrypoint = _mlgate_run(config, args) if self._nodes(job) == 1 else \
                _nodes_run(config, args, self._nodes(job), self._resources(job), self.settings.placement_strategy,
                           submission_id(job.id, queue.runner_origin(self.engine, job.id, job.attempts)))
            yield Spec(entrypoint, staged, self._env(job, env, token=True), self._metadata(job, role))

    @contextlib.contextmanager
    def _build_spec(self, job: Job) -> Iterator[Spec]:
        """An outsider's build: no credential, its tree as an archive, run in the sandbox by this module."""
        from triggers.jobs.sandbox import Limits

        # bubblewrap is the node's business: the wrapper there fails closed without it (the service's machine
        # need not have it)
        build_dir = self._build_dir(job, job.attempts)
        shutil.rmtree(build_dir, ignore_errors=True)
        self._private_workdir(build_dir)
        limits = Limits.resolve(self.config.service.sandbox_limits, self.config.service.job_timeout_minutes)
        with self._checkout(job, base=False) as (tree, config, sha), self._staged(job, tree) as staged:
            ship = staged.parent / "ship"
            ship.mkdir()
            with tarfile.open(ship / TREE_ARCHIVE, "w") as archive:
                archive.add(staged, arcname="tree")
            args = runner_arguments(job, "build", "", sha=sha, exchange=str(build_dir))
            entrypoint = shlex.join(["python", "-I", "-m", "triggers.jobs.ray_executor", "sandbox-build",
                                     "--archive", TREE_ARCHIVE, "--config", str(config), "--writable", str(build_dir),
                                     "--limits", json.dumps(dataclasses.asdict(limits)), "--", *args])
            yield Spec(entrypoint, ship, self._env(job, {}, token=False), self._metadata(job, "build"))

    def _judge_spec(self, job: Job, judge_dir: Path) -> SpecMaker:
        @contextlib.contextmanager
        def spec() -> Iterator[Spec]:
            with self._checkout(job, base=True) as (tree, config, _), self._staged(job, tree) as staged:
                args = runner_arguments(job, "judge", self.settings.service_url, exchange=str(judge_dir))
                held_out_dir = self.config.service.held_out_dir
                held_out = held_out_dir / f"{job.model}.npz" if held_out_dir is not None else None
                if held_out is not None and held_out.is_file():   # the judge's alone: the build never had it
                    args += ["--held-out", str(held_out.resolve())]
                env = {"MLGATE_WORKDIR": str(self._private_workdir(judge_dir / "work"))}
                yield Spec(_mlgate_run(config, args), staged, self._env(job, env, token=True),
                           self._metadata(job, "judge"))
        return spec

    def _env(self, job: Job, env: dict[str, str], token: bool) -> dict[str, str]:
        """A submission's env_vars. Readable by anything that can reach the dashboard: only trusted code's carry
        a credential."""
        grace = self._grace(job)
        env = env | {STOP_WAIT_ENV: str(math.ceil(grace + self.settings.stop_grace_margin_seconds))}
        if token:
            from triggers.jobs.runner_results import TOKEN_ENV

            env[TOKEN_ENV] = result_token(job, job.attempts, self.config.service.job_timeout_minutes)
        return env

    def _registry_env(self) -> dict[str, str]:
        """What a retrain needs to promote into the service's registry: the registry's variables the service has
        (HOME is the node's own), and service.job_env."""
        from triggers.jobs.sandbox import REGISTRY_ENV

        names = [n for n in REGISTRY_ENV if n != "HOME"] + list(self.config.service.job_env)
        return {name: os.environ[name] for name in names if name in os.environ}

    def _metadata(self, job: Job, role: str) -> dict[str, str]:
        return {"mlgate_job": job.id, "mlgate_attempt": str(job.attempts), "mlgate_role": role,
                "mlgate_model": job.model}

    @contextlib.contextmanager
    def _checkout(self, job: Job, base: bool) -> Iterator[tuple[Path, Path, str | None]]:
        """(tree, its config file relative to it, the commit): the job's commit, or the base branch's head."""
        from triggers.jobs.checkout import repository_root, resolve_commit, worktree

        config_file = Path(self.config_path or "mlgate.yaml").resolve()
        if self.config.service.checkout == "in_place":   # no git: the service's own files
            yield config_file.parent, Path(config_file.name), job.sha
            return
        repo = repository_root(config_file.parent)
        sha = resolve_commit(repo, None if base else job.sha, self.config.service.branch)
        name = f"{job.id}-ray-judge" if base else f"{job.id}-ray"
        with worktree(repo, sha, self.config.workdir / "worktrees" / name) as tree:
            yield tree, config_file.relative_to(repo), sha

    @contextlib.contextmanager
    def _staged(self, job: Job, tree: Path) -> Iterator[Path]:
        """`tree` copied for Ray to ship (stage_tree), removed once submitted: Ray uploads it during the call."""
        scratch = self.config.workdir / "ray-staging"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch, prefix=f"{job.id}-") as folder:
            staged = Path(folder) / "tree"
            left_out = stage_tree(tree, staged, leave_out=(self.config.workdir.resolve(),))
            if left_out:
                log.warning("links not shipped to Ray", extra={"job_id": job.id, "paths": left_out[:20]})
            yield staged

    # --- waiting ---------------------------------------------------------------------------------------------

    def _await_report(self, job: Job, runner: Runner, lost: threading.Event) -> Outcome | None:
        """Wait for the runner's report (None), or its end without one (failed, with Ray's reason)."""
        with self._follow(job, runner) as follow:
            reason = wait_for_report(self.engine, job, lost, self.settings.poll_seconds, follow.ended,
                                     grace_seconds=REPORT_GRACE_SECONDS)
            if reason is None and self._reported(job):
                follow.settle(REPORT_GRACE_SECONDS)   # the runner exits after posting: its whole log, its status
                return None
            if reason is None or reason == "lost":
                return self._let_go(job, runner)   # followed still: a stopped runner's last words are kept
        log.warning("Ray job ended without a report", extra={"job_id": job.id, "submission": runner.id})
        return Outcome("failed", {"error": reason})

    def _reported(self, job: Job) -> bool:
        """This attempt ended by the runner's own report (not cancelled, not another worker's now)."""
        current = queue.get_job(self.engine, job.id)
        return current is not None and current.attempts == job.attempts and \
            current.state in queue.FINAL_STATES and current.state != "cancelled"

    def _await_end(self, job: Job, follow: "Follow", lost: threading.Event) -> Any:
        """Wait for a submission that reports nothing (a build) to end: its details, or None when the job ended
        or stopped being this attempt's (cancelled, recovered) or `lost` was set."""
        while True:
            current = queue.get_job(self.engine, job.id)
            if current is None or current.state != "running" or current.attempts != job.attempts:
                return None
            info = follow.poll()
            if info is not None and str(info.status) not in ACTIVE:
                return info
            if lost.wait(self.settings.poll_seconds):
                return None

    def _follow(self, job: Job, runner: Runner) -> "Follow":
        progress = None
        if runner.id.endswith("-judge"):
            progress = self._exchange(job) / f"a{runner.attempt}-judge" / "work"
        elif not runner.id.endswith("-build"):   # never the build's: its epochs and accuracy are claims
            progress = self._exchange(job) / "work" if job.trigger == "pr" else self.config.workdir
        return Follow(self, job, runner.id, progress)

    def _let_go(self, job: Job, runner: Runner) -> None:
        """The wait ended without an end of the runner's: stop it when the job was cancelled or timed out; leave
        it running when the service is going away or another worker has the job (it re-attaches)."""
        current = queue.get_job(self.engine, job.id)
        if current is not None and current.state == "cancelled":
            self._stop(job, runner.id)
        elif current is not None and current.state == "running" and current.attempts == job.attempts and \
                self._timed_out(current):
            # recorded before the stop: the runner's exit-75 report would otherwise requeue it as preempted
            minutes = self.config.service.job_timeout_minutes
            queue.finish(self.engine, job.id, job.worker_id or "", "failed", attempt=job.attempts,
                         error=f"timed out after {minutes:g} min (service.job_timeout_minutes); the job was stopped")
            self._stop(job, runner.id)
        elif current is not None and current.state == "running":
            log.info("leaving the Ray job running for the next attempt", extra={"job_id": job.id,
                                                                              "submission": runner.id})
        return None

    def _timed_out(self, current: Job) -> bool:
        started = queue.as_utc(current.started_at)
        if started is None:
            return False
        from datetime import datetime, timezone

        elapsed = (datetime.now(timezone.utc) - started).total_seconds()
        return elapsed >= self.config.service.job_timeout_minutes * 60 - 1.0

    def _stop(self, job: Job, sid: str) -> bool:
        """Stop a submission: SIGTERM (the runner checkpoints), Ray's SIGKILL after the grace and a margin; if it
        still runs a margin later, ask again. True once it ended."""
        try:
            self.client.stop_job(sid)
        except Exception as exc:
            log.error("could not stop the Ray job", extra={"job_id": job.id, "submission": sid,
                                                          "error": _one_line(exc)})
        log.info("Ray job stopping", extra={"job_id": job.id, "submission": sid})
        # the service asks again this long after Ray's SIGKILL was due
        deadline = time.monotonic() + math.ceil(self._grace(job)) + 2 * self.settings.stop_grace_margin_seconds
        while time.monotonic() < deadline:
            info = self.info(sid)
            if info is not None and str(info.status) not in ACTIVE:
                log.info("Ray job stopped", extra={"job_id": job.id, "submission": sid, "status": str(info.status)})
                return True
            time.sleep(min(1.0, self.settings.poll_seconds))
        log.error("Ray job still running past its grace period; stopping it again",
                  extra={"job_id": job.id, "submission": sid})
        with contextlib.suppress(Exception):
            self.client.stop_job(sid)
        return False

    def info(self, sid: str) -> Any:
        """The submission's details; None when Ray has none by that id, or did not answer (polled again)."""
        try:
            return self.client.get_job_info(sid)
        except RuntimeError as exc:
            if "status code 404" not in str(exc):
                self._warn(sid, "Ray job not readable; polling on", exc)
            return None
        except RayUnavailable:
            raise
        except Exception as exc:   # the dashboard restarting: the runner goes on regardless
            self._warn(sid, "Ray dashboard not answering; polling on", exc)
            return None

    def _warn(self, sid: str, message: str, exc: BaseException) -> None:
        """At most one warning a minute per submission: an outage polled every second is one line a minute."""
        now = time.monotonic()
        if now - self._warned.get(sid, -WARN_EVERY_SECONDS) >= WARN_EVERY_SECONDS:
            self._warned[sid] = now
            log.warning(message, extra={"submission": sid, "error": _one_line(exc)})

    # --- places ----------------------------------------------------------------------------------------------

    def _grace(self, job: Job) -> float:
        return self.config.model(job.model).train.preemption_grace_seconds if job.model in self.config.models \
            else 30.0

    def log_path(self, job: Job) -> Path:
        return self.config.workdir / "jobs" / job.id / "job.log"

    def _exchange(self, job: Job) -> Path:
        """The job's folder in the exchange the service and Ray nodes share (service.ray.exchange_dir)."""
        return (self.settings.exchange_dir or self.config.workdir / "exchange").resolve() / job.id

    def _build_dir(self, job: Job, attempt: int) -> Path:
        return self._exchange(job) / f"a{attempt}-build"

    def _private_workdir(self, folder: Path) -> Path:
        """A runner's own workdir (a PR job's, the judge's, the build's): its MLflow store a fresh copy."""
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "mlflow.db").exists():
            from automation.tracking import empty_store

            shutil.copyfile(empty_store(self.config.workdir), folder / "mlflow.db")
        return folder


class Follow:
    """What the service reads of a running submission at each poll: its details, its log (appended to the job's
    log, at most service.ray.log_limit_kb per submission) and, for trusted code, its progress."""

    def __init__(self, executor: RayExecutor, job: Job, sid: str, progress_workdir: Path | None) -> None:
        from automation.progress import PROGRESS_FILE, ProgressFile

        self.executor, self.job, self.sid = executor, job, sid
        self.limit = executor.settings.log_limit_kb * 1024
        self.seen = self.written = 0
        self.capped = False
        self.log = open(executor.log_path(job), "ab")
        self.log.write(f"--- Ray job {sid} ---\n".encode())
        self.progress = ProgressFile(progress_workdir / "jobs" / job.id / PROGRESS_FILE) \
            if progress_workdir is not None else None

    def poll(self) -> Any:
        self._pump()
        if self.progress is not None and (update := self.progress.changed()) is not None:
            queue.record_progress(self.executor.engine, self.job.id, self.job.attempts, update)
        return self.executor.info(self.sid)

    def ended(self) -> RunnerEnd | None:
        """For remote.wait_for_report: how the runner ended, as Ray tells it; None while it runs."""
        info = self.poll()
        if info is None or str(info.status) in ACTIVE:
            return None
        return RunnerEnd(failed=str(info.status) != "SUCCEEDED", reason=ray_reason(self.sid, info))

    def settle(self, seconds: float) -> None:
        """Follow a submission whose runner has reported until it ends, for at most `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            info = self.poll()
            if info is not None and str(info.status) not in ACTIVE:
                return
            time.sleep(min(0.5, self.executor.settings.poll_seconds))

    def _pump(self) -> None:
        """The log's new part, up to the limit; then one line saying it was cut, and no more fetching."""
        if self.capped:
            return
        try:
            text = self.executor.client.get_job_logs(self.sid)
        except Exception:   # not there yet, or the dashboard is busy: the next poll reads it
            return
        new, self.seen = text[self.seen:].encode(errors="replace"), len(text)
        room = self.limit - self.written
        self.log.write(new[:room])
        self.written += min(len(new), room)
        if len(new) > room:
            self.capped = True
            self.log.write(f"\n[log cut at {self.limit // 1024} KB (service.ray.log_limit_kb); the rest stays "
                           f"in Ray: ray job logs {self.sid}]\n".encode())
        self.log.flush()

    def close(self) -> None:
        self._pump()
        self.log.close()

    def __enter__(self) -> "Follow":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _mlgate_run(config: Path, args: list[str]) -> str:
    """The entrypoint of a runner that runs trusted code: `python -m` from the working_dir, so its code runs."""
    return shlex.join(["python", "-m", "triggers.cli", "--config", str(config), "run", *args])


def _nodes_run(config: Path, args: list[str], nodes: int, resources: Any, strategy: str, run_id: str) -> str:
    """The entrypoint of a run across `nodes` Ray nodes: torchrun per worker (triggers/jobs/ray_nodes.py)."""
    return shlex.join(["python", "-m", "triggers.jobs.ray_nodes", "--nodes", str(nodes), "--cpus", f"{resources.cpus:g}",
                       "--gpus", str(resources.gpus), "--memory", str(memory_bytes(resources.memory)),
                       "--strategy", strategy, "--run-id", run_id, "--", "--config", str(config), "run", *args])


def _one_line(exc: BaseException) -> str:
    """An exception in one line, bounded (Ray's errors carry a server traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    said = next((line for line in reversed(lines) if "Error" in line and not line.startswith("File ")), None)
    return f"{type(exc).__name__}: {said or (lines[0] if lines else '')}"[:500]


# --- on the Ray node: an outsider's build, sandboxed ------------------------------------------------------------

def sandbox_build(argv: list[str]) -> int:
    """`python -I -m triggers.jobs.ray_executor sandbox-build …`: unpack the PR's tree from the archive in the
    working_dir into a private folder, and run `mlgate run` on it in the bubblewrap sandbox (sandbox.py): nobody,
    no network, an empty environment, the tree read-only, only `--writable` writable, under the service's limits.
    Returns the build's exit code, which nothing trusted reads."""
    import argparse
    import functools
    import signal
    import subprocess

    from triggers.jobs.sandbox import Limits, SandboxUnavailable, job_environment, sandboxed

    parser = argparse.ArgumentParser(prog="sandbox-build")
    parser.add_argument("--archive", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--writable", required=True)
    parser.add_argument("--limits", required=True)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    args = options.args[1:] if options.args[:1] == ["--"] else options.args
    limits = Limits(**json.loads(options.limits))
    writable = Path(options.writable)
    # Ray's stop sends SIGTERM to every process of the submission. The build checkpoints on it; this process
    # and bubblewrap must outlive it: bubblewrap dies of a SIGTERM, and its --die-with-parent then SIGKILLs the
    # build mid-checkpoint. So this process waits it out, and bubblewrap starts with SIGTERM ignored (inherited
    # across exec; the build's own handler replaces it)
    signal.signal(signal.SIGTERM, lambda *_: None)
    with tempfile.TemporaryDirectory(prefix="mlgate-build-") as folder:
        with tarfile.open(options.archive) as archive:
            archive.extractall(folder, filter="data")   # no links out, no devices, no absolute paths
        tree = Path(folder) / "tree"
        env = job_environment(False, set_to={"MLGATE_WORKDIR": str(writable)})
        try:
            command = sandboxed([sys.executable, "-m", "triggers.cli", "--config", str(tree / options.config),
                                 "run", *args], cwd=tree, writable=writable, env=env, tmp_mb=limits.tmp_mb)
        except SandboxUnavailable as exc:   # fail closed: PR code never runs unsandboxed
            print(exc.format(), file=sys.stderr)
            return 1
        return subprocess.run(command, preexec_fn=functools.partial(_in_build, limits)).returncode


def _in_build(limits: Any) -> None:
    """In bubblewrap's process, before exec: the limits, and SIGTERM ignored (see sandbox_build)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    limits.apply()


def main(argv: list[str]) -> int:
    if argv[:1] == ["sandbox-build"]:
        return sandbox_build(argv[1:])
    print(f"usage: python -I -m {__spec__.name if __spec__ else 'ray_executor'} sandbox-build ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
