"""Jobs through the kubernetes executor, end to end: `mlgate serve` (executor: kubernetes) talks to an API
server through a kubeconfig, as it would to a cluster; pods run the manifests' own commands (tests/kube_cluster.py)
and report back to the service with their Secret's credential.

- a push job waits in Kueue's queue (suspended, shown as queued), survives a compacted watch (410), has its
  pod evicted mid-training (DisruptionTarget) and ends with the weights of an uninterrupted run;
- the service killed mid-job and started again re-attaches to the running Job: one Job, one promotion;
- an outsider's PR: its build has no credential and no network, the base branch judges its candidate;
- cancelling deletes the Job and stops its pod.

The model is a user's own file, not one of the examples. With MLGATE_TEST_KUBECONFIG the API server is that
cluster's (the kubelet here then only runs the pods its Job controller makes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import yaml

from automation.config import load_config
from automation.progress import PROGRESS_FILE
from automation.store import open_store
from tests.conftest import fast_config, git_commit, project_files, seed_mlflow_store, wait_for
from tests.kube_cluster import EmulatedApiServer, Kubelet, bare_remote, client_for
from tests.test_preemption import SLOW_MODEL, trained_weights
from triggers.github.job_status import summary_file
from triggers.jobs import queue
from triggers.local_broker import free_port

pytestmark = pytest.mark.slow
NAMESPACE, EPOCHS, SECRET = "mlgate-jobs", 6, "result-minting-secret"


class Service:
    """`mlgate serve` with one worker and the kubernetes executor, on a free port."""

    def __init__(self, repo: Path, state: Path, kubeconfig: Path) -> None:
        self.repo, self.state, self.kubeconfig = repo, state, kubeconfig
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "Service":
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLGATE_", "MLFLOW_", "GITHUB_", "KUBE"))}
        log = open(self.state / "service.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "triggers.cli", "--config", str(self.repo / "mlgate.yaml"), "serve", "--port",
             str(self.port)], stdout=log, stderr=subprocess.STDOUT, cwd=self.repo,
            env=clean | {"KUBECONFIG": str(self.kubeconfig), "MLGATE_RESULT_SECRET": SECRET,
                         "GITHUB_WEBHOOK_SECRET": "webhook-secret", "GITHUB_REPOSITORY": "acme/models",
                         "MLGATE_DATABASE_URL": f"sqlite:///{self.state / 'mlgate.db'}"})
        import httpx

        def up() -> bool:
            try:
                return httpx.get(self.url + "/healthz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(lambda: self.process.poll() is not None or up(), 60)   # type: ignore[union-attr]
        assert up(), (self.state / "service.log").read_text()[-3000:]
        return self

    def kill(self) -> None:
        """The machine is gone: no clean-up, no goodbye to the cluster."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def log(self) -> str:
        return (self.state / "service.log").read_text(errors="replace")[-4000:]


REAL = os.environ.get("MLGATE_TEST_KUBECONFIG")


@pytest.fixture(scope="module", params=["emulated", pytest.param("real", marks=[
    pytest.mark.real_kubernetes, pytest.mark.skipif(not REAL, reason="MLGATE_TEST_KUBECONFIG names no cluster")])])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            mlflow_template: Path) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("kube")
    real = REAL if request.param == "real" else None
    server = None if real else EmulatedApiServer(root)
    kubeconfig = Path(real) if real else server.kubeconfig   # type: ignore[union-attr]
    repo, state = root / "repo", root / "state"
    state.mkdir()
    config = fast_config(lean=True)
    config["workdir"] = str(state)
    config["models"] = {"slow_mlp": {
        "module": "slow_mlp", "params": {"hidden": 32, "dropout": 0.2},
        "resources": {"cpus": 1, "memory": "2Gi"},
        "train": {"epochs": EPOCHS, "batch_size": 128, "lr": 0.01, "lr_schedule": "onecycle", "patience": EPOCHS,
                  "preemption_grace_seconds": 20}}}
    service = Service(repo, state, kubeconfig)
    config["service"] = {
        "executor": "kubernetes", "lease_seconds": 3, "workers": 1,
        "kubernetes": {"namespace": NAMESPACE, "service_url": service.url, "env_secret": "mlgate-registry",
                       "queue_name": "team-a", "poll_seconds": 0.5, "ttl_seconds_after_finished": 600}}
    files = project_files("models") | {"slow_mlp.py": SLOW_MODEL, "mlgate.yaml": yaml.safe_dump(config)}
    base = git_commit(repo, files, "the service's repository")
    config["service"]["kubernetes"]["repository_url"] = bare_remote(repo, root)
    base = git_commit(repo, {"mlgate.yaml": yaml.safe_dump(config)}, "fetch from the remote")
    bare_remote(repo, root)
    loaded = load_config(repo / "mlgate.yaml")
    seed_mlflow_store(loaded.workdir, mlflow_template)
    from automation import tracking

    tracking.connect(loaded.workdir, loaded.experiment)   # the experiment and its artifact root, made here
    client = client_for(kubeconfig)
    from kubernetes import client as k8s

    if real:
        _fresh_namespace(client)

    k8s.CoreV1Api(client).create_namespaced_secret(NAMESPACE, {"metadata": {"name": "mlgate-registry"}, "stringData": {
        "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}})
    with Kubelet(client, NAMESPACE, root, server.emulator if server else None, controller=server is not None) as kubelet:
        yield {"config": loaded, "engine": open_store(f"sqlite:///{state / 'mlgate.db'}"), "service": service,
               "kubelet": kubelet, "client": client, "server": server, "repo": repo, "base": base, "root": root}
        service.kill()
    if server is not None:
        server.close()


def _fresh_namespace(client: Any) -> None:
    """On a real cluster: the namespace, and its default ServiceAccount (pods are refused until it exists)."""
    from kubernetes import client as k8s
    from kubernetes.client import ApiException

    core = k8s.CoreV1Api(client)
    try:
        core.create_namespace({"metadata": {"name": NAMESPACE}})
    except ApiException as exc:
        if exc.status != 409:
            raise
    try:
        core.create_namespaced_service_account(NAMESPACE, {"metadata": {"name": "default"}})
    except ApiException as exc:
        if exc.status != 409:
            raise


def _jobs(cluster: dict[str, Any], job_id: str) -> list[dict[str, Any]]:
    from kubernetes import client as k8s

    batch = k8s.BatchV1Api(cluster["client"])
    listed = batch.list_namespaced_job(NAMESPACE, label_selector=f"mlgate.dev/job-id={job_id}").items
    return [batch.api_client.sanitize_for_serialization(j) for j in listed]


def _admit(cluster: dict[str, Any], name: str) -> None:
    """What Kueue does on admission: un-suspend the Job."""
    from kubernetes import client as k8s

    k8s.BatchV1Api(cluster["client"]).patch_namespaced_job(name, NAMESPACE, {"spec": {"suspend": False}})


def _admitted_push(cluster: dict[str, Any]) -> tuple[queue.Job, str]:
    """A push job whose Kubernetes Job Kueue admitted and whose first pod started: the job and the Job's name."""
    job, _ = queue.enqueue(cluster["engine"], model="slow_mlp", kind="retrain", trigger="push", sha=cluster["base"])
    assert wait_for(lambda: len(_jobs(cluster, job.id)) == 1, 60)
    name = _jobs(cluster, job.id)[0]["metadata"]["name"]
    _admit(cluster, name)
    assert wait_for(lambda: bool(cluster["kubelet"].pods_of(name)), 60)
    return job, name


def _progress_epoch(cluster: dict[str, Any], pod: str, job_id: str) -> int:
    path = cluster["root"] / "pods" / pod / "volumes" / "workspace" / ".mlgate" / "jobs" / job_id / PROGRESS_FILE
    try:
        return int(json.loads(path.read_text()).get("epoch") or 0)
    except (OSError, ValueError):
        return 0


def _summary(cluster: dict[str, Any], job_id: str) -> dict[str, Any]:
    return json.loads(summary_file(cluster["config"].workdir, job_id).read_text())


def _ended(cluster: dict[str, Any], job_id: str, timeout: float = 300) -> queue.Job:
    engine = cluster["engine"]
    assert wait_for(lambda: queue.get_job(engine, job_id).state in queue.FINAL_STATES, timeout, interval=1), \
        cluster["service"].log()
    return queue.get_job(engine, job_id)


def test_a_service_killed_mid_job_re_attaches_to_its_job_one_job_one_promotion(cluster: dict[str, Any]) -> None:
    service, kubelet, engine = cluster["service"].start(), cluster["kubelet"], cluster["engine"]
    job, _ = queue.enqueue(engine, model="slow_mlp", kind="retrain", trigger="push", sha=cluster["base"],
                           max_attempts=3)
    assert wait_for(lambda: len(_jobs(cluster, job.id)) == 1, 60), service.log()
    name = _jobs(cluster, job.id)[0]["metadata"]["name"]
    assert name == f"mlgate-{job.id}-a1"
    # Kueue holds it: suspended, and the job says it is queued
    assert wait_for(lambda: (queue.attempts(engine, job.id)[-1].as_dict()["progress"] or {}).get("stage") == "queued", 30)
    assert _jobs(cluster, job.id)[0]["spec"]["suspend"] is True and not kubelet.started
    if cluster["server"] is not None:   # the watch's version is compacted away (a real server does so on its own)
        cluster["server"].emulator.expire_watches = 2
    _admit(cluster, name)
    assert wait_for(lambda: any(_progress_epoch(cluster, p, job.id) >= 1 for p in kubelet.pods_of(name)), 120), \
        service.log()
    service.kill()   # mid-training: the pod goes on without it
    service.start()
    done = _ended(cluster, job.id)
    assert done.state == "succeeded", (done.as_dict(), service.log())
    assert wait_for(lambda: any(c["type"] == "Complete" for c in
                                (_jobs(cluster, job.id)[0].get("status") or {}).get("conditions") or []), 60)
    jobs = _jobs(cluster, job.id)
    assert [j["metadata"]["name"] for j in jobs] == [name]   # re-attached, not created again
    assert done.attempts == 2 and queue.runner_origin(engine, job.id, 2) == 1
    assert len(kubelet.pods_of(name)) == 1
    summary = _summary(cluster, job.id)
    assert summary["promoted"] is True and summary["job_id"] == job.id
    if cluster["server"] is not None:   # the compacted watch was listed again, and the job went on
        assert "watch expired (410 Gone); listing again" in (service.state / "service.log").read_text()
    from automation import tracking

    client, _ = tracking.connect(cluster["config"].workdir, cluster["config"].experiment)
    versions = client.search_model_versions("name='slow_mlp'")
    assert len(versions) == 1   # one registration, one promotion
    assert client.get_model_version_by_alias("slow_mlp", "production").version == versions[0].version
    cluster["uninterrupted_run"] = done.run_id


def test_an_evicted_pod_resumes_from_its_checkpoint_with_the_uninterrupted_weights(cluster: dict[str, Any]) -> None:
    if "uninterrupted_run" not in cluster:
        pytest.skip("needs the uninterrupted run of the test before")
    engine, kubelet = cluster["engine"], cluster["kubelet"]
    job, name = _admitted_push(cluster)
    first = kubelet.pods_of(name)[0]
    assert wait_for(lambda: _progress_epoch(cluster, first, job.id) >= 2, 120), cluster["service"].log()
    kubelet.evict(first)
    done = _ended(cluster, job.id)
    assert done.state in ("succeeded", "gate_failed"), done.as_dict()
    assert done.attempts == 1   # the platform's retry, not the service's: no second attempt
    assert len(kubelet.pods_of(name)) == 2 and kubelet.pods_of(name)[0] == first   # the evicted one, then its successor
    training = _summary(cluster, job.id)["training"]
    assert training["resumed_from"]["epoch"] >= 2 and len(training["history"]) == EPOCHS
    sys.path.insert(0, str(cluster["repo"]))   # the registered model pickles the user's class by its module
    try:
        resumed = trained_weights(cluster["config"], done.run_id)
        uninterrupted = trained_weights(cluster["config"], cluster["uninterrupted_run"])
    finally:
        sys.path.remove(str(cluster["repo"]))
    for key, tensor in uninterrupted.items():
        assert torch.equal(tensor, resumed[key]), key


def test_an_outsiders_pr_is_built_without_credentials_and_judged_by_the_base_branch(cluster: dict[str, Any]) -> None:
    engine, repo = cluster["engine"], cluster["repo"]
    subprocess.run(["git", "checkout", "-q", "-b", "outsider"], cwd=repo, check=True)
    model = (repo / "slow_mlp.py").read_text().replace("hidden: int = 32", "hidden: int = 24")
    pr_sha = git_commit(repo, {"slow_mlp.py": model}, "an outsider's change")
    subprocess.run(["git", "checkout", "-q", "main"], cwd=repo, check=True)
    bare_remote(repo, cluster["root"])
    job, _ = queue.enqueue(engine, model="slow_mlp", kind="evaluate", trigger="pr", sha=pr_sha, pr=5,
                           payload={"author_writes": False})
    for phase in ("fetch", "build", "judge"):
        target = f"mlgate-{job.id}-a1-{phase}"
        assert wait_for(lambda: any(j["metadata"]["name"] == target for j in _jobs(cluster, job.id)), 240), \
            cluster["service"].log()
        _admit(cluster, target)
    done = _ended(cluster, job.id)
    assert done.state in ("succeeded", "gate_failed"), (done.as_dict(), cluster["service"].log())
    summary = _summary(cluster, job.id)
    assert summary["promoted"] is False and summary["trigger"] == "pr"
    build = next(j for j in _jobs(cluster, job.id) if j["metadata"]["name"].endswith("-build"))
    text = json.dumps(build)
    assert "MLGATE_RESULT_TOKEN" not in text and "secretKeyRef" not in text and "secretRef" not in text
    from kubernetes import client as k8s

    policies = k8s.NetworkingV1Api(cluster["client"]).list_namespaced_network_policy(NAMESPACE).items
    assert any(p.metadata.name == f"mlgate-{job.id}-a1-build-isolated" and p.spec.egress == [] for p in policies)
    build_log = "".join(cluster["kubelet"].log_of(p) for p in cluster["kubelet"].pods_of(f"mlgate-{job.id}-a1-build"))
    assert SECRET not in build_log


def test_cancelling_deletes_the_job_and_stops_its_pod(cluster: dict[str, Any]) -> None:
    engine, kubelet = cluster["engine"], cluster["kubelet"]
    job, name = _admitted_push(cluster)
    assert wait_for(lambda: _progress_epoch(cluster, kubelet.pods_of(name)[0], job.id) >= 1, 120)
    assert queue.cancel(engine, job.id, "a maintainer stopped it")
    assert wait_for(lambda: not _jobs(cluster, job.id), 60), cluster["service"].log()
    pod = kubelet.pods[kubelet.pods_of(name)[0]]
    assert wait_for(lambda: pod.process is not None and pod.process.poll() is not None, 60)
    assert queue.get_job(engine, job.id).state == "cancelled"


def test_cancelling_an_outsiders_pr_while_queued_starts_no_later_phase(cluster: dict[str, Any]) -> None:
    """Kueue still holds the fetch Job when a maintainer cancels: it is deleted, with its volume, and neither
    the build nor the judge is ever created."""
    engine = cluster["engine"]
    job, _ = queue.enqueue(engine, model="slow_mlp", kind="evaluate", trigger="pr", sha=cluster["base"], pr=6,
                           payload={"author_writes": False})
    fetch = f"mlgate-{job.id}-a1-fetch"
    assert wait_for(lambda: [j["metadata"]["name"] for j in _jobs(cluster, job.id)] == [fetch], 60)
    assert queue.cancel(engine, job.id, "not this one")
    assert wait_for(lambda: not _jobs(cluster, job.id), 60), cluster["service"].log()
    from kubernetes import client as k8s

    claims = k8s.CoreV1Api(cluster["client"]).list_namespaced_persistent_volume_claim(NAMESPACE).items
    assert wait_for(lambda: not any(c.metadata.name == f"mlgate-{job.id}-a1-exchange" for c in
                                    k8s.CoreV1Api(cluster["client"]).list_namespaced_persistent_volume_claim(
                                        NAMESPACE).items), 30), [c.metadata.name for c in claims]
    if cluster["server"] is not None:   # the emulator keeps every object it ever held, deleted ones too
        ever = {name for (_resource, _namespace, name) in cluster["server"].emulator.objects}
        assert fetch in ever and not {f"mlgate-{job.id}-a1-build", f"mlgate-{job.id}-a1-judge"} & ever
