"""A GitOps setting for tests: a bare remote (the "GitHub" repository), the service's clone of it, a
developer's clone that pushes changes, and an MLflow registry whose versions hold real files.

Versions are registered from small artifact folders (no training): the reconciler and the publisher read only
versions, their files and their aliases.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from automation.config import MlgateConfig, parse_config
from automation.deploy_file import DeployFile, artifact_digest, deploy_path

MODEL = "fraud_scorer"   # not one of the examples: the name, stage folders and files are the user's


def sh(cwd: Path, *args: str) -> str:
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def git(cwd: Path, *args: str) -> str:
    return sh(cwd, "git", "-c", "user.email=dev@example.com", "-c", "user.name=dev", *args)


@dataclass
class GitOpsRepo:
    remote: Path
    service: Path      # the service's clone; mlgate.yaml lives here
    developer: Path
    config: MlgateConfig
    client: Any
    engine: Any

    def head(self) -> str:
        return git(self.remote, "rev-parse", "refs/heads/main")

    def push_files(self, files: dict[str, str | None], message: str = "change") -> str:
        """A developer commits `files` (None: delete) on main and pushes; the new head."""
        git(self.developer, "pull", "-q", "--ff-only", "origin", "main")
        for name, text in files.items():
            path = self.developer / name
            if text is None:
                git(self.developer, "rm", "-q", name)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            git(self.developer, "add", name)
        git(self.developer, "commit", "-qm", message)
        git(self.developer, "push", "-q", "origin", "main")
        return self.head()

    def declare(self, version: str, digest: str | None = None, message: str | None = None) -> str:
        """Push a production deploy file declaring `version` (with its true digest unless given)."""
        declared = DeployFile(model=MODEL, stage="production", version=version,
                              digest=digest or self.digest(version), variant="onnx_fp32")
        path = deploy_path(self.config.service.gitops.folder, "production", MODEL)
        return self.push_files({path: declared.render()}, message or f"Promote {MODEL} to v{version}")

    def digest(self, version: str) -> str:
        import tempfile

        import mlflow

        with tempfile.TemporaryDirectory() as scratch:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL}/{version}", dst_path=scratch)
            return artifact_digest(Path(local))

    def register(self, weights: bytes) -> str:
        """A new version of MODEL whose files are an MLmodel file and `weights`; its number."""
        import mlflow

        experiment = self.client.get_experiment_by_name("gitops") or None
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("gitops")
        run = self.client.create_run(experiment_id)
        folder = self.service.parent / f"artifact-{run.info.run_id}"
        folder.mkdir()
        (folder / "MLmodel").write_text("flavors: {}\n", encoding="utf-8")
        (folder / "weights.bin").write_bytes(weights)
        self.client.log_artifacts(run.info.run_id, str(folder), "model")
        self.client.set_terminated(run.info.run_id)
        try:
            self.client.create_registered_model(MODEL)
        except mlflow.exceptions.MlflowException:
            pass
        version = self.client.create_model_version(MODEL, f"{run.info.artifact_uri}/model", run.info.run_id)
        return str(version.version)


def gitops_config(directory: Path, mode: str = "commit", on_drift: str = "restore",
                  stages: list[str] | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"module": "models.digits_mlp",
                             "promotion": {"mode": mode, "on_drift": on_drift, "stages": stages or ["production"]}}
    if "staging" in (stages or []):   # its rollout's analysis proposes production
        block["rollout"] = {"stages": [{"traffic": 0, "min_seconds": 0, "min_requests": 1}]}
    return {"version": 1, "workdir": str(directory / "state"), "experiment": "gitops", "models": {MODEL: block},
            "service": {"branch": "main"}}


def make_repo(tmp_path: Path, template: Path, mode: str = "commit", on_drift: str = "restore",
              stages: list[str] | None = None) -> GitOpsRepo:
    """The three repositories and a registry in `tmp_path`; the service's clone holds mlgate.yaml."""
    from automation import proposals, store, tracking  # noqa: F401  (proposals: its table)
    from tests.conftest import seed_mlflow_store
    from triggers.gitops import reconcile  # noqa: F401  (its table)

    remote, service, developer = tmp_path / "remote.git", tmp_path / "service", tmp_path / "developer"
    sh(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(remote))
    raw = gitops_config(tmp_path, mode, on_drift, stages)
    seed = tmp_path / "seed"
    seed.mkdir()
    git(seed, "init", "-q", "-b", "main")
    (seed / "mlgate.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    git(seed, "add", "mlgate.yaml")
    git(seed, "commit", "-qm", "mlgate.yaml")
    git(seed, "push", "-q", str(remote), "main")
    sh(tmp_path, "git", "clone", "-q", str(remote), str(service))
    sh(tmp_path, "git", "clone", "-q", str(remote), str(developer))
    config = parse_config((service / "mlgate.yaml").read_text(), "mlgate.yaml", service)
    seed_mlflow_store(config.workdir, template)
    client = tracking.connect(config.workdir, config.experiment)[0]
    engine = store.open_store(store.database_url(config.workdir))
    return GitOpsRepo(remote, service, developer, config, client, engine)
