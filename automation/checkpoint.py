"""Checkpoints that the next attempt of the same job resumes from, and the preemption notice (SIGTERM).

A checkpoint is one `torch.save` file plus a sidecar holding its SHA-256, each written to a temporary name,
flushed and renamed: a reader sees a whole checkpoint or none, and a file whose digest does not match (a torn
copy, a full disk) is passed over for the one before it. Only tensors and plain values go in, so reading one
back uses `torch.load(weights_only=True)` and runs no pickled code.

A checkpoint belongs to its job: it records what wrote it (`Lineage`: the config, the data and the code), a
resume under another lineage starts fresh and says why, and a job that ends (but for a preemption) deletes
its checkpoints (`CheckpointDir.clear`), here and in the artifact store.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automation.errors import MlgateError

log = logging.getLogger(__name__)

FORMAT = 1
KEEP = 2   # the newest and the one before: a torn newest still leaves a whole one


class Preempted(MlgateError):
    """The runner is going away (SIGTERM, a cancel, the job's time-out): the job checkpointed and stopped.
    The service requeues it as `preempted`; the next attempt resumes from the checkpoint."""

    exit_code = 75   # EX_TEMPFAIL: try again later


# TrainConfig fields that say how or where training runs, not what it computes: a resume may change them
# (more time, another machine, another checkpoint interval) and still go on with the same weights
RUN_ONLY = frozenset({"checkpoint_every_minutes", "preemption_grace_seconds", "max_minutes", "abort_when_hopeless",
                      "loader_workers", "distributed", "threads", "nodes"})


@dataclass(frozen=True)
class Lineage:
    """What wrote a checkpoint. Resuming under another config, other data or other code would carry weights
    trained one way into a run that says another (a changed lr once trained 0 epochs and registered the old
    weights under the new lr): such a checkpoint is passed over."""
    config: dict[str, Any]        # "model.<param>" and "train.<field>" (those that shape the weights), as JSON has them
    data: str                     # automation/fingerprint.data_fingerprint
    code: str                     # automation/fingerprint.code_fingerprint: the model file's content
    commit: str | None = None     # the job's commit, where it knows it

    @classmethod
    def of(cls, params: dict[str, Any], train: Any, data: str, code: str, commit: str | None = None) -> "Lineage":
        settings = {f"model.{k}": v for k, v in params.items()}
        settings |= {f"train.{k}": v for k, v in train.model_dump().items() if k not in RUN_ONLY}
        return cls(json.loads(json.dumps(settings, sort_keys=True, default=str)), data, code, commit)

    def record(self) -> dict[str, str]:
        """Plain strings, so `torch.load(weights_only=True)` reads it back."""
        return {"config": json.dumps(self.config, sort_keys=True), "data": self.data, "code": self.code,
                "commit": self.commit or ""}

    def differences(self, recorded: dict[str, str] | None) -> list[str]:
        """What differs from the lineage a checkpoint recorded, in words; empty when it may be resumed."""
        if not recorded:
            return ["an mlgate that recorded no config, data or code"]
        theirs = json.loads(recorded.get("config") or "{}")
        changed = sorted(k for k in theirs.keys() | self.config.keys() if theirs.get(k) != self.config.get(k))
        found = []
        if changed:
            found.append("another config (" + ", ".join(
                f"{k.split('.', 1)[1]} {_short(theirs.get(k))} -> {_short(self.config.get(k))}" for k in changed) + ")")
        if recorded.get("data") != self.data:
            found.append("other data")
        if recorded.get("code") != self.code:
            found.append("other code (the model file changed)")
        elif recorded.get("commit") and self.commit and recorded["commit"] != self.commit:
            found.append(f"other code (commit {recorded['commit'][:12]} -> {self.commit[:12]})")
        return found


def _short(value: Any) -> str:
    text = "unset" if value is None else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Saved:
    path: Path
    epoch: int
    step: int
    seconds: float   # how long writing it took


class CheckpointDir:
    """A job's checkpoints in one folder: `ckpt-<epoch>-<step>.pt` and `….pt.json` (digest, size, position).
    With a `mirror` (ArtifactMirror), each one is also copied where another runner's retry finds it, and an
    empty folder is filled from there first."""

    def __init__(self, folder: Path, keep: int = KEEP, mirror: "ArtifactMirror | None" = None) -> None:
        self.folder, self.keep, self.mirror = Path(folder), keep, mirror

    def save(self, state: dict[str, Any], epoch: int, step: int) -> Saved:
        import torch

        started = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, **state}, buffer)
        data = buffer.getvalue()
        path = self.folder / f"ckpt-{epoch:05d}-{step:07d}.pt"
        _write_atomically(path, data)
        sidecar = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "epoch": epoch, "step": step}
        _write_atomically(path.with_name(path.name + ".json"), json.dumps(sidecar).encode())
        self._prune()
        if self.mirror is not None:
            self.mirror.upload(path)
        return Saved(path, epoch, step, time.perf_counter() - started)

    def _complete(self) -> list[tuple[tuple[int, int], Path]]:
        found = []
        for sidecar in self.folder.glob("ckpt-*.pt.json"):
            try:
                meta = json.loads(sidecar.read_text())
                found.append(((int(meta["epoch"]), int(meta["step"])), sidecar.with_suffix("")))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(found, reverse=True)

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint whose bytes match their recorded digest, loaded on the CPU; None if none."""
        import torch

        if self.mirror is not None and not self._complete():   # a fresh workspace: the retry of another runner
            self.mirror.download(self.folder)
        if not self.folder.is_dir():
            return None
        for _, path in self._complete():
            try:
                meta = json.loads(path.with_name(path.name + ".json").read_text())
                data = path.read_bytes()
            except OSError:
                continue
            if len(data) != meta.get("bytes") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
                log.warning("checkpoint does not match its digest; passing over it", extra={"checkpoint": path.name})
                continue
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if state.get("format") != FORMAT:
                log.warning("checkpoint of another format; passing over it", extra={"checkpoint": path.name})
                continue
            return state
        return None

    def _prune(self) -> None:
        for _, path in self._complete()[self.keep:]:
            for stale in (path, path.with_name(path.name + ".json")):
                stale.unlink(missing_ok=True)
        for torn in self.folder.glob("*.tmp"):   # a write cut short by an earlier attempt's death
            torn.unlink(missing_ok=True)

    def clear(self, why: str) -> None:
        """Delete every checkpoint, here and in the artifact store: nothing will resume from them."""
        removed = 0
        if self.folder.is_dir():
            for path in list(self.folder.iterdir()):
                if path.is_file():
                    path.unlink(missing_ok=True)
                    removed += path.name.endswith(".pt")
            try:
                self.folder.rmdir()
            except OSError:   # something not ours in it: left alone
                pass
        if self.mirror is not None:
            try:
                self.mirror.discard()
            except Exception as exc:   # the job's outcome stands; only the same config, data and code resume one
                log.warning("checkpoints in the artifact store not deleted",
                            extra={"error": f"{type(exc).__name__}: {exc}"[:300], "job_id": self.mirror.job_id})
        log.info("checkpoints deleted", extra={"folder": str(self.folder), "checkpoints": removed, "why": why,
                                               "artifact_store": self.mirror is not None})


class ArtifactMirror:
    """Checkpoints in the MLflow artifact store, for a job whose next attempt may run on another machine (the
    `github` executor's runners): one run per job, in the experiment `<experiment>-checkpoints`, tagged with the
    job id. A checkpoint is uploaded before its sidecar, so a sidecar there means the file is whole; the digest
    is checked again after download. The run is deleted when the job ends."""

    TAG = "mlgate.checkpoint_job"

    def __init__(self, client: Any, experiment: str, job_id: str, artifact_location: str | None = None) -> None:
        self.client, self.job_id = client, job_id
        found = client.get_experiment_by_name(f"{experiment}-checkpoints")
        self.experiment_id = found.experiment_id if found is not None else \
            client.create_experiment(f"{experiment}-checkpoints", artifact_location=artifact_location)
        self._run_id: str | None = None

    def _run(self, create: bool) -> str | None:
        if self._run_id is None:
            key = hashlib.sha256(self.job_id.encode()).hexdigest()[:32]   # a job id may hold quotes
            runs = self.client.search_runs([self.experiment_id], f"tags.`{self.TAG}` = '{key}'", max_results=1)
            if runs:
                self._run_id = runs[0].info.run_id
            elif create:
                self._run_id = self.client.create_run(self.experiment_id, tags={self.TAG: key},
                                                      run_name=f"checkpoints-{self.job_id[:60]}").info.run_id
        return self._run_id

    def upload(self, path: Path) -> None:
        run_id = self._run(create=True)
        self.client.log_artifact(run_id, str(path), artifact_path="checkpoints")
        self.client.log_artifact(run_id, str(path.with_name(path.name + ".json")), artifact_path="checkpoints")

    def download(self, folder: Path) -> None:
        """The newest checkpoints that have their sidecar, into `folder` (digests are checked on reading)."""
        run_id = self._run(create=False)
        if run_id is None:
            return
        names = {Path(a.path).name for a in self.client.list_artifacts(run_id, "checkpoints")}
        whole = sorted((n for n in names if n.endswith(".pt") and f"{n}.json" in names), reverse=True)[:KEEP]
        folder.mkdir(parents=True, exist_ok=True)
        for name in whole:   # the file first, then its sidecar: what makes it count here, too
            for part in (name, f"{name}.json"):
                self.client.download_artifacts(run_id, f"checkpoints/{part}", str(folder))
        fetched = folder / "checkpoints"
        if fetched.is_dir():
            for part in sorted(fetched.iterdir(), key=lambda p: p.name.endswith(".json")):
                part.replace(folder / part.name)
            fetched.rmdir()
        log.info("checkpoints fetched from the artifact store", extra={"job_id": self.job_id, "found": len(whole)})

    def discard(self) -> None:
        """Delete the job's checkpoint run; again is a no-op (a deleted run is not found)."""
        run_id = self._run(create=False)
        if run_id is not None:
            self.client.delete_run(run_id)
        self._run_id = None   # the next upload (a fresh start) makes a new run


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)   # the rename itself survives a power cut
    finally:
        os.close(directory)


class PreemptionNotice:
    """SIGTERM (or SIGINT) asks training to stop at the next step boundary and checkpoint. If that has not happened within
    `grace_seconds`, the process exits anyway with Preempted's code: the last complete checkpoint stands, a
    half-written one is never read. Outside training (nothing to checkpoint) it exits at once. Installed only
    in the main thread (signals are delivered there)."""

    def __init__(self, grace_seconds: float, enabled: bool = True) -> None:
        self.grace_seconds, self.enabled = grace_seconds, enabled   # disabled: nothing to resume from
        self.training = False   # set by the training loop while it can checkpoint
        self.requested = threading.Event()
        self.received_at: float | None = None
        self._previous: Any = None
        self._watchdog: threading.Timer | None = None

    # SIGINT too: GitHub's cancel (and a job's timeout-minutes) sends it first, 7.5 s before SIGTERM
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> "PreemptionNotice":
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in (self._previous or {}).items():
            signal.signal(sig, previous)
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested.is_set():
            return
        self.received_at = time.monotonic()
        self.requested.set()
        if not self.training:   # before or after training: the newest checkpoint already holds everything
            self._exit("preempted outside training: the next attempt resumes from the newest checkpoint")
        self._watchdog = threading.Timer(self.grace_seconds, self._out_of_time)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _out_of_time(self) -> None:
        self._exit(f"preempted: no checkpoint within the {self.grace_seconds:g} s grace period; the last complete "
                   "one stands")

    @staticmethod
    def _exit(message: str) -> None:
        import sys

        print(f"Error: {message}", file=sys.stderr, flush=True)
        os._exit(Preempted.exit_code)
