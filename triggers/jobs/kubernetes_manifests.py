"""The Kubernetes objects one attempt of a job is made of, as plain manifests (dicts): pure functions of the
config and the job, so every one can be validated against the API's schemas (tests) and read in a review.

A trusted attempt (a retrain, a writer's PR) is one batch/v1 Job: an init container fetches exactly the
commit (as Actions' checkout does, with a read-only credential from a Secret), then mlgate's image runs
`mlgate run` in that checkout and reports with a per-attempt credential held in a Secret the Job owns.

An outsider's PR is three Jobs sharing one volume: `fetch` (git only) puts the PR's tree on it; `build` runs
the PR's code with no Secret, no service-account token, no network (a NetworkPolicy denies all egress) and a
hardened security context, leaving its candidate on the volume; `judge` runs the base branch's code on the
candidate and alone reports. The build's exit code and output are never read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from automation.config import MlgateConfig, ModelConfig
from triggers.jobs.queue import Job
from triggers.jobs.remote import RESUMED_BY_ENV, Role, runner_arguments

Phase = Literal["job", "fetch", "build", "judge"]
LABEL = "mlgate.dev"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CONTAINER = "mlgate"
WORKSPACE, EXCHANGE, GIT_CREDENTIAL = "/workspace", "/exchange", "/var/run/mlgate-git"
USER_ID = 65532                       # non-root; the image's files need only be world-readable
GRACE_MARGIN_SECONDS = 30             # beyond the model's preemption grace: the checkpoint upload
USAGE_EXIT_CODE = 2                   # a bad config or model file: no retry can fix it
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.-]")

# What the checkout container runs: exactly the commit, shallow, and a check that it is that commit. The
# credential is read from the Secret's file by a credential helper, never put on a command line.
CHECKOUT_SCRIPT = """set -eu
git init -q "$DEST" && cd "$DEST"
if [ -f "$GIT_CREDENTIAL/token" ]; then
  git config credential.helper '!f() { echo username=x-access-token; echo "password=$(cat "$GIT_CREDENTIAL/token")"; }; f'
fi
git fetch -q --depth 1 --no-tags "$REPOSITORY_URL" "$SHA"
git checkout -q --detach FETCH_HEAD
test "$(git rev-parse HEAD)" = "$SHA"
git config --unset credential.helper || true
"""


@dataclass(frozen=True)
class Attempt:
    """One attempt's identity in the cluster: the job, the attempt whose runner it is, the commit it runs."""
    job: Job
    runner_attempt: int
    sha: str
    base_sha: str | None = None       # an outsider's PR: the base branch's commit that judges it

    def name(self, phase: Phase) -> str:
        """Deterministic: a restarted service finds its Job again by this name (63 characters at most)."""
        base = f"mlgate-{self.job.id.lower()}-a{self.runner_attempt}"
        return base if phase == "job" else f"{base}-{phase}"

    def labels(self, phase: Phase) -> dict[str, str]:
        return {"app.kubernetes.io/name": "mlgate", "app.kubernetes.io/component": phase,
                f"{LABEL}/job-id": self.job.id, f"{LABEL}/attempt": str(self.runner_attempt),
                f"{LABEL}/model": label_value(self.job.model), f"{LABEL}/trigger": label_value(self.job.trigger)}


def label_value(text: str) -> str:
    """A label value: 63 characters of [A-Za-z0-9_.-], starting and ending alphanumeric."""
    return _LABEL_VALUE.sub("-", text)[:63].strip("-_.") or "none"


def secret_name(attempt: Attempt, phase: Phase) -> str:
    return f"{attempt.name(phase)}-result"


def exchange_claim_name(attempt: Attempt) -> str:
    return f"{attempt.name('job')}-exchange"


def _owner(owner: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"apiVersion": "batch/v1", "kind": "Job", "name": owner["metadata"]["name"],
             "uid": owner["metadata"]["uid"], "controller": False, "blockOwnerDeletion": False}]


def result_secret(attempt: Attempt, phase: Phase, token: str, owner: dict[str, Any]) -> dict[str, Any]:
    """The runner's credential, owned by its Job (deleted with it), never in the Job's spec or annotations."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": secret_name(attempt, phase), "labels": attempt.labels(phase),
                         "ownerReferences": _owner(owner)},
            "stringData": {"token": token}}


def build_network_policy(attempt: Attempt, owner: dict[str, Any]) -> dict[str, Any]:
    """No traffic in or out of an outsider's build: not the service, not the registry, not the internet."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"{attempt.name('build')}-isolated", "labels": attempt.labels("build"),
                         "ownerReferences": _owner(owner)},
            "spec": {"podSelector": {"matchLabels": {f"{LABEL}/job-id": attempt.job.id,
                                                     "app.kubernetes.io/component": "build"}},
                     "policyTypes": ["Ingress", "Egress"], "ingress": [], "egress": []}}


def exchange_claim(config: MlgateConfig, attempt: Attempt) -> dict[str, Any]:
    """The volume an outsider's PR moves across: the PR's tree (fetch → build) and its candidate (→ judge)."""
    settings = config.service.kubernetes
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": settings.candidate_storage}}}
    if settings.storage_class:
        spec["storageClassName"] = settings.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": exchange_claim_name(attempt), "labels": attempt.labels("job")}, "spec": spec}


def rendezvous_service(attempt: Attempt) -> dict[str, Any]:
    """A headless Service: an Indexed Job's pods find rank 0 (index 0) by a stable DNS name."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": attempt.name("job"), "labels": attempt.labels("job")},
            "spec": {"clusterIP": "None", "selector": {f"{LABEL}/job-id": attempt.job.id,
                                                       "app.kubernetes.io/component": "job"},
                     "ports": [{"name": "rendezvous", "port": 29400}], "publishNotReadyAddresses": True}}


def _security(read_only_root: bool = True) -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": read_only_root,
            "runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _repository_url(config: MlgateConfig, repository: str | None) -> str:
    url = config.service.kubernetes.repository_url
    if url:
        return url
    if not repository:
        raise ValueError("service.kubernetes.repository_url is empty and GITHUB_REPOSITORY is not set: pods "
                         "cannot fetch the commit")
    return f"https://github.com/{repository}.git"


def _checkout(config: MlgateConfig, repository: str | None, sha: str, dest: str, mount: dict[str, Any],
              credential: bool) -> dict[str, Any]:
    settings = config.service.kubernetes
    mounts = [mount, {"name": "tmp", "mountPath": "/tmp"}]
    if credential and settings.git_secret:
        mounts.append({"name": "git-credential", "mountPath": GIT_CREDENTIAL, "readOnly": True})
    return {"name": "checkout", "image": settings.checkout_image, "command": ["sh", "-c", CHECKOUT_SCRIPT],
            "env": [{"name": "REPOSITORY_URL", "value": _repository_url(config, repository)},
                    {"name": "SHA", "value": sha}, {"name": "DEST", "value": dest},
                    {"name": "GIT_CREDENTIAL", "value": GIT_CREDENTIAL}, {"name": "HOME", "value": "/tmp"}],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
            "volumeMounts": mounts, "securityContext": _security()}


def _resources(model: ModelConfig) -> dict[str, Any]:
    wanted = model.resources
    requests: dict[str, Any] = {"cpu": f"{wanted.cpus:g}", "memory": wanted.memory}
    limits: dict[str, Any] = {"memory": wanted.memory}
    if wanted.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(wanted.gpus)
    return {"requests": requests, "limits": limits}


def _job(config: MlgateConfig, attempt: Attempt, phase: Phase, pod: dict[str, Any], *,
         indexed_nodes: int = 1) -> dict[str, Any]:
    """A suspended Job: the executor puts its Secret (owned by it) in place first, then lets it go (or Kueue
    does, on admission). Evictions and preemptions never count against backoffLimit; a usage error fails at once."""
    settings = config.service.kubernetes
    model = config.models.get(attempt.job.model)
    grace = (model.train.preemption_grace_seconds if model else 30.0) + GRACE_MARGIN_SECONDS
    labels = attempt.labels(phase)
    if settings.queue_name:
        labels[QUEUE_LABEL] = settings.queue_name
    pod_spec = {"restartPolicy": "Never", "terminationGracePeriodSeconds": int(grace),
                "automountServiceAccountToken": False, "enableServiceLinks": False,
                "securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID,
                                    "fsGroup": USER_ID, "seccompProfile": {"type": "RuntimeDefault"}},
                **pod}
    if model is not None and model.resources.node_selector:
        pod_spec["nodeSelector"] = dict(model.resources.node_selector)
    if model is not None and model.resources.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in model.resources.tolerations]
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in settings.image_pull_secrets]
    spec: dict[str, Any] = {
        "suspend": True, "backoffLimit": settings.backoff_limit,
        "activeDeadlineSeconds": int(config.service.job_timeout_minutes * 60),
        "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
        "podFailurePolicy": {"rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                  "values": [USAGE_EXIT_CODE]}}]},
        "template": {"metadata": {"labels": labels}, "spec": pod_spec}}
    if indexed_nodes > 1:   # one pod per node, each knowing its index: torchrun's node rank
        spec |= {"completionMode": "Indexed", "completions": indexed_nodes, "parallelism": indexed_nodes}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": attempt.name(phase), "labels": labels,
                         "annotations": {f"{LABEL}/sha": attempt.sha,
                                         **({f"{LABEL}/base-sha": attempt.base_sha} if attempt.base_sha else {})}},
            "spec": spec}


def _volumes(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": "tmp", "emptyDir": {"sizeLimit": "8Gi"}}, *extra]


def _runner_container(config: MlgateConfig, attempt: Attempt, role: Role, config_file: str, *, workdir: str,
                      exchange: str | None, env: list[dict[str, Any]], mounts: list[dict[str, Any]],
                      env_from_secret: bool) -> dict[str, Any]:
    settings = config.service.kubernetes
    model = config.model(attempt.job.model)
    args = ["-m", "triggers.cli", "--config", config_file, "run",
            *runner_arguments(attempt.job, role, settings.service_url, sha=attempt.sha, exchange=exchange)]
    container: dict[str, Any] = {
        "name": CONTAINER, "image": model.resources.image or settings.image, "command": ["python"], "args": args,
        "workingDir": f"{WORKSPACE}/src",
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "MLGATE_WORKDIR", "value": workdir},
                {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}, {"name": "OMP_WAIT_POLICY", "value": "PASSIVE"},
                *env],
        "resources": _resources(model), "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *mounts],
        "securityContext": _security()}
    if env_from_secret and settings.env_secret:
        container["envFrom"] = [{"secretRef": {"name": settings.env_secret}}]
    return container


def _token_env(attempt: Attempt, phase: Phase) -> dict[str, Any]:
    return {"name": "MLGATE_RESULT_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": secret_name(attempt, phase), "key": "token"}}}


def _git_volume(config: MlgateConfig) -> list[dict[str, Any]]:
    secret = config.service.kubernetes.git_secret
    return [{"name": "git-credential", "secret": {"secretName": secret, "defaultMode": 0o440}}] if secret else []


def _rendezvous_env(attempt: Attempt, nodes: int) -> list[dict[str, Any]]:
    """What automation/launch.py reads to join torchrun's rendezvous across an Indexed Job's pods."""
    if nodes <= 1:
        return []
    name = attempt.name("job")
    return [{"name": "MLGATE_NNODES", "value": str(nodes)},
            {"name": "MLGATE_NODE_RANK", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
            {"name": "MLGATE_RDZV_ENDPOINT", "value": f"{name}-0.{name}:29400"},
            {"name": "MLGATE_RDZV_ID", "value": name}]


def trusted_job(config: MlgateConfig, attempt: Attempt, config_file: str, repository: str | None,
                role: Role = "job", phase: Phase = "job") -> dict[str, Any]:
    """A retrain, a writer's PR (role `job`), or the judge of an outsider's PR (role `judge`, phase `judge`,
    the candidate on the exchange volume, read-only)."""
    settings = config.service.kubernetes
    nodes = config.model(attempt.job.model).train.nodes if role == "job" else 1
    workspace = {"name": "workspace", "mountPath": WORKSPACE}
    mounts = [workspace]
    volumes = _volumes({"name": "workspace", "emptyDir": {}}, *_git_volume(config))
    if role == "judge":
        mounts.append({"name": "exchange", "mountPath": EXCHANGE, "subPath": "out", "readOnly": True})
        volumes.append({"name": "exchange", "persistentVolumeClaim": {"claimName": exchange_claim_name(attempt),
                                                                      "readOnly": True}})
    env = [_token_env(attempt, phase), {"name": RESUMED_BY_ENV, "value": "platform"},
           *_rendezvous_env(attempt, nodes)]
    main = _runner_container(config, attempt, role, config_file, workdir=f"{WORKSPACE}/.mlgate",
                             exchange=EXCHANGE if role == "judge" else None, env=env, mounts=mounts,
                             env_from_secret=True)
    sha = attempt.base_sha if role == "judge" and attempt.base_sha else attempt.sha
    pod: dict[str, Any] = {"initContainers": [_checkout(config, repository, sha, f"{WORKSPACE}/src", workspace,
                                                        credential=True)],
                           "containers": [main], "volumes": volumes}
    if settings.service_account:
        pod["serviceAccountName"] = settings.service_account
    if nodes > 1:
        pod["subdomain"] = attempt.name("job")   # pods resolve as <job>-<index>.<service>
    return _job(config, attempt, phase, pod, indexed_nodes=nodes)


def fetch_job(config: MlgateConfig, attempt: Attempt, repository: str | None) -> dict[str, Any]:
    """git only: the PR's tree onto the exchange volume, for a build that may not reach the network."""
    exchange = {"name": "exchange", "mountPath": EXCHANGE}
    checkout = _checkout(config, repository, attempt.sha, f"{EXCHANGE}/src", exchange, credential=True)
    checkout["name"] = CONTAINER
    pod = {"containers": [checkout],
           "volumes": _volumes({"name": "exchange", "persistentVolumeClaim": {"claimName": exchange_claim_name(attempt)}},
                               *_git_volume(config))}
    return _job(config, attempt, "fetch", pod)


def build_job(config: MlgateConfig, attempt: Attempt, config_file: str) -> dict[str, Any]:
    """The PR's own code: no Secret, no service-account token, no network, read-only source and root; it
    may write only its exchange folder (candidate, checkpoints) and /tmp."""
    mounts = [{"name": "exchange", "mountPath": f"{WORKSPACE}/src", "subPath": "src", "readOnly": True},
              {"name": "exchange", "mountPath": EXCHANGE, "subPath": "out"}]
    main = _runner_container(config, attempt, "build", config_file, workdir="/tmp/mlgate", exchange=EXCHANGE,
                             env=[{"name": RESUMED_BY_ENV, "value": "platform"}], mounts=mounts,
                             env_from_secret=False)
    pod = {"containers": [main],
           "volumes": _volumes({"name": "exchange", "persistentVolumeClaim": {"claimName": exchange_claim_name(attempt)}})}
    return _job(config, attempt, "build", pod)


def service_role(namespace: str) -> dict[str, Any]:
    """What the service itself may do in the jobs' namespace, and nothing more."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "mlgate-executor", "namespace": namespace},
            "rules": [
                {"apiGroups": ["batch"], "resources": ["jobs"],
                 "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
                {"apiGroups": [""], "resources": ["persistentvolumeclaims", "services"],
                 "verbs": ["get", "create", "delete"]},
                {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["create"]}]}
