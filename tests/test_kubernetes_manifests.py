"""Every object the kubernetes executor writes, validated against the Kubernetes API's OpenAPI schemas of the
versions mlgate supports (kubernetes-validate, strict: an unknown field is an error), and what each must and
must not hold: the credential only in the attempt's Secret, an outsider's build with nothing to steal and
nowhere to send it, evictions that do not count, names a restarted service finds again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from automation.config import parse_config
from triggers.jobs import kubernetes_manifests as k8s
from triggers.jobs.queue import Job

VERSIONS = ["1.31.0", "1.33.0", "1.35.0", "1.37.0"]
TOKEN = "j0b.1.1999999999." + "f" * 64
CONFIG = """
models:
  sees_in_colour:
    module: models.fashion_resnet
    train: {preemption_grace_seconds: 90, nodes: 1}
    resources:
      gpus: 2
      cpus: 6
      memory: 24Gi
      node_selector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}
      tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
  across_nodes:
    module: models.digits_mlp
    train: {nodes: 3}
service:
  executor: kubernetes
  job_timeout_minutes: 120
  kubernetes:
    namespace: ml-jobs
    image: registry.example/mlgate:1.0
    service_url: https://mlgate.example
    git_secret: mlgate-git-read
    env_secret: mlgate-registry
    queue_name: team-a
    service_account: mlgate-runner
    image_pull_secrets: [registry-pull]
    storage_class: fast
"""


def _config(text: str = CONFIG) -> Any:
    return parse_config(text, "mlgate.yaml", Path.cwd())


def _job(model: str = "sees_in_colour", trigger: str = "push", writes: bool | None = None) -> Job:
    payload = {} if writes is None else {"author_writes": writes}
    return Job(id="a1b2c3d4e5f6", model=model, kind="retrain", trigger=trigger, sha="c" * 40,
               pr=7 if trigger == "pr" else None, payload=json.dumps(payload), attempts=2)


OWNER = {"metadata": {"name": "owner", "uid": "0b6b5c3e-6c1e-4f5e-9a55-0d1f7e2c1a11"}}


def _everything() -> dict[str, dict[str, Any]]:
    config = _config()
    push = k8s.Attempt(_job(), 2, "c" * 40)
    pr = k8s.Attempt(_job(trigger="pr", writes=False), 2, "c" * 40, base_sha="b" * 40)
    nodes = k8s.Attempt(_job("across_nodes"), 1, "d" * 40)
    return {
        "trusted": k8s.trusted_job(config, push, "mlgate.yaml", "acme/models"),
        "multi-node": k8s.trusted_job(config, nodes, "mlgate.yaml", "acme/models"),
        "rendezvous": k8s.rendezvous_service(nodes),
        "secret": k8s.result_secret(push, "job", TOKEN, OWNER),
        "fetch": k8s.fetch_job(config, pr, "acme/models"),
        "build": k8s.build_job(config, pr, "mlgate.yaml"),
        "judge": k8s.trusted_job(config, pr, "mlgate.yaml", "acme/models", role="judge", phase="judge"),
        "isolation": k8s.build_network_policy(pr, OWNER),
        "exchange": k8s.exchange_claim(config, pr),
        "role": k8s.service_role("ml-jobs"),
    }


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_each_supported_kubernetes_version(version: str) -> None:
    for what, manifest in _everything().items():
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{what} is not a valid {manifest['kind']} for Kubernetes {version}: {exc}")


def _pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def test_a_trusted_job_carries_its_credential_only_by_reference_to_its_own_secret() -> None:
    objects = _everything()
    trusted, secret = objects["trusted"], objects["secret"]
    assert TOKEN not in json.dumps(trusted)   # not in the spec, its arguments, or its annotations
    assert secret["stringData"] == {"token": TOKEN}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == OWNER["metadata"]["uid"]   # deleted with its Job
    main = _pod(trusted)["containers"][0]
    refs = [e["valueFrom"]["secretKeyRef"] for e in main["env"] if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]]
    assert refs == [{"name": secret["metadata"]["name"], "key": "token"}]
    assert main["envFrom"] == [{"secretRef": {"name": "mlgate-registry"}}]


def test_a_job_is_named_labelled_queued_and_bounded_as_the_issue_says() -> None:
    trusted = _everything()["trusted"]
    assert trusted["metadata"]["name"] == "mlgate-a1b2c3d4e5f6-a2"
    labels = trusted["metadata"]["labels"]
    assert labels["mlgate.dev/model"] == "sees_in_colour" and labels["mlgate.dev/job-id"] == "a1b2c3d4e5f6"
    assert labels["mlgate.dev/trigger"] == "push" and labels["kueue.x-k8s.io/queue-name"] == "team-a"
    spec = trusted["spec"]
    assert spec["suspend"] is True   # Kueue admits it; without a queue the executor lets it go
    assert spec["activeDeadlineSeconds"] == 120 * 60 and spec["ttlSecondsAfterFinished"] == 3600
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    pod = _pod(trusted)
    assert pod["terminationGracePeriodSeconds"] >= 90 + 30
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["serviceAccountName"] == "mlgate-runner"
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "2" and resources["requests"]["cpu"] == "6"
    checkout = pod["initContainers"][0]
    env = {e["name"]: e.get("value") for e in checkout["env"]}
    assert env["SHA"] == "c" * 40 and env["REPOSITORY_URL"] == "https://github.com/acme/models.git"
    assert {"name": "git-credential", "mountPath": k8s.GIT_CREDENTIAL, "readOnly": True} in checkout["volumeMounts"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--sha") + 1] == "c" * 40 and "--report-to" in args and "--checkpoint-store" in args


def test_an_outsiders_build_has_no_secret_no_token_no_network_and_a_hardened_pod() -> None:
    objects = _everything()
    build = objects["build"]
    text = json.dumps(build)
    assert "secretKeyRef" not in text and "secretRef" not in text and '"secret"' not in text
    assert "--report-to" not in text and TOKEN not in text
    pod = _pod(build)
    assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
    for container in pod["containers"]:
        security = container["securityContext"]
        assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
        assert security["allowPrivilegeEscalation"] is False and security["capabilities"] == {"drop": ["ALL"]}
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        source = next(m for m in container["volumeMounts"] if m["mountPath"] == "/workspace/src")
        assert source["readOnly"] is True
    policy = objects["isolation"]
    assert policy["spec"]["egress"] == [] and set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert all(build["spec"]["template"]["metadata"]["labels"][k] == v for k, v in selector.items())


def test_the_judge_runs_the_base_branch_on_the_candidate_read_only() -> None:
    judge = _everything()["judge"]
    pod = _pod(judge)
    assert {e["name"]: e.get("value") for e in pod["initContainers"][0]["env"]}["SHA"] == "b" * 40
    main = pod["containers"][0]
    assert main["args"][main["args"].index("--judge") + 1] == "/exchange/candidate"
    exchange = next(m for m in main["volumeMounts"] if m["mountPath"] == "/exchange")
    assert exchange["readOnly"] is True and exchange["subPath"] == "out"


def test_training_across_nodes_is_an_indexed_job_with_a_rendezvous_service() -> None:
    objects = _everything()
    job, service = objects["multi-node"], objects["rendezvous"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 3
    assert _pod(job)["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    env = {e["name"]: e for e in _pod(job)["containers"][0]["env"]}
    assert env["MLGATE_NNODES"]["value"] == "3"
    assert "job-completion-index" in env["MLGATE_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]


def test_the_services_role_grants_only_what_the_executor_uses() -> None:
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in _everything()["role"]["rules"]}
    assert rules[(("",), ("secrets",))] == {"create"}   # it writes credentials, never reads one back
    assert all("*" not in verbs and "escalate" not in verbs and "bind" not in verbs for verbs in rules.values())
    assert not any("exec" in r or "attach" in r for (_g, resources) in rules for r in resources)


@pytest.mark.parametrize("model", ["Ünïcode-模型", "a" * 200, "../../etc", "-_.", "x y\nz"])
def test_hostile_model_names_still_make_valid_labels_and_names(model: str) -> None:
    config = _config(CONFIG.replace("across_nodes:", f"{json.dumps(model)}:"))
    attempt = k8s.Attempt(_job(model), 12, "e" * 40)
    manifest = k8s.trusted_job(config, attempt, "mlgate.yaml", "acme/models")
    kubernetes_validate.validate(manifest, VERSIONS[-1], strict=True)
    assert len(manifest["metadata"]["name"]) <= 63


def test_a_repository_is_needed_to_fetch_the_commit() -> None:
    config = _config(CONFIG.replace("    storage_class: fast\n", ""))
    with pytest.raises(ValueError, match="repository_url"):
        k8s.trusted_job(config, k8s.Attempt(_job(), 1, "c" * 40), "mlgate.yaml", None)


def test_a_job_kueue_holds_shows_as_queued_on_its_check_run() -> None:
    from triggers.github.check_runs import progress_text

    title, summary = progress_text({"stage": "queued", "detail": "waiting for Kueue to admit the job Job into "
                                                                 "queue team-a"})
    assert title.startswith("queued") and "team-a" in summary


def test_the_readmes_role_is_the_one_the_executor_needs() -> None:
    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\n", 1)[1].split("---", 1)[0]
    documented = yaml.safe_load("apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\n" + block)
    assert documented == k8s.service_role("mlgate")


@pytest.mark.parametrize("missing", ["MLGATE_RESULT_SECRET", "service_url", "repository"])
def test_the_service_refuses_to_start_a_kubernetes_executor_it_cannot_run(missing: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from automation.errors import UsageError
    from triggers.jobs.kubernetes_executor import executor_from_env

    text = CONFIG.replace("    service_url: https://mlgate.example\n", "" if missing == "service_url" else
                          "    service_url: https://mlgate.example\n")
    monkeypatch.delenv("GITHUB_REPOSITORY", raising=False)
    if missing != "MLGATE_RESULT_SECRET":
        monkeypatch.setenv("MLGATE_RESULT_SECRET", "s3cret")
    if missing != "repository":
        monkeypatch.setenv("GITHUB_REPOSITORY", "acme/models")
    with pytest.raises(UsageError, match=missing.split("_")[0].lower() if missing != "MLGATE_RESULT_SECRET" else missing):
        executor_from_env(_config(text), "mlgate.yaml", None)   # type: ignore[arg-type]
