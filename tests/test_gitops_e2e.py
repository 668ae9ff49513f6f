"""GitOps promotion end to end, real parts only (issue 32): a bare git remote is the "GitHub" repository, GitHub's
REST API is Prism serving GitHub's OpenAPI description (it answers 422 to a request outside the contract), the
service (`mlgate serve`) and `mlgate serve-model` run as processes on the MLflow registry, and a developer's clone
does what people do: push, merge the promotion pull request, `git revert` it.

A passing job opens a promotion pull request and promotes nothing; merging it (the merge commit's push webhook)
moves the alias; serve-model serves exactly the declared version and digest; a revert brings the old version
back; an alias moved by hand is put back; the service killed (SIGKILL) after a job and while a merge lands ends
where the deploy files say, with one audit row per promotion and one pull request per proposal.
"""

from __future__ import annotations

import copy
import json
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import (JOB_THREADS, ServeProcess, fast_config, git_commit, project_files, seed_mlflow_store,
                            wait_for, webhook_examples, wine_frame)
from tests.gitops_repo import git, sh
from tests.prism import prism_server
from triggers.local_broker import free_port
from triggers.request_guard import sign

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SECRET = "gitops-e2e-secret"
REPOSITORY = "octocat/Hello-World"
TOKEN = "ghp_not-a-real-token-0123456789"
MODEL = "cellar"   # a user's own model, not an example: tests/fixtures/wine_model.py on a CSV of wines
USER_MODEL = ROOT / "tests" / "fixtures" / "wine_model.py"
DEPLOY = f"deploy/production/{MODEL}.yaml"
BRANCH = f"mlgate/promote/production/{MODEL}"


@pytest.fixture(scope="module")
def prism(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(url, log path): GitHub's API as its OpenAPI description allows it (tests/prism.py)."""
    with prism_server(tmp_path_factory.mktemp("prism")) as running:
        yield running


def project_config(reconcile_seconds: float, csv: Path) -> dict[str, Any]:
    config = fast_config(epochs=60, lean=True)
    config["defaults"]["train"].update(batch_size=16, patience=60)
    config["models"] = {MODEL: {"module": MODEL, "data": {"path": str(csv)}, "params": {"hidden": 32},
                                "promotion": {"mode": "pull_request"}}}
    # git and the registry are under test here, not the gate: the second job must not fail on latency noise
    config["defaults"]["gates"]["relative"] = {"max_accuracy_drop": 0.05, "max_latency_increase": None}
    config["service"] = {"workers": 1, "lease_seconds": 30, "branch": "main",
                         "gitops": {"reconcile_seconds": reconcile_seconds}}
    return config


class Service(ServeProcess):
    """`mlgate serve` in its own clone of the remote, reporting to Prism; each start logs to a folder of its own."""

    def __init__(self, clone: Path, logs: Path, prism_url: str) -> None:
        logs.mkdir(parents=True)
        super().__init__(clone / "mlgate.yaml", logs, cwd=clone, env={
            "GITHUB_WEBHOOK_SECRET": SECRET, "GITHUB_REPOSITORY": REPOSITORY, "GITHUB_TOKEN": TOKEN,
            "GITHUB_API_URL": prism_url, "MLGATE_LOG_LEVEL": "info", **JOB_THREADS})
        self.clone = clone

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/jobs/{job_id}").json()

    def finished(self, job_id: str) -> bool:
        return self.job(job_id)["state"] not in ("queued", "running")

    def gitops(self) -> dict[str, Any]:
        return self.get("/gitops").json()

    def kill(self) -> str:
        """SIGKILL: no shutdown path runs."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(20)
        self.log.close()
        return (self.directory / "service.log").read_text(errors="replace")

    def log_text(self) -> str:
        self.log.flush()
        return (self.directory / "service.log").read_text(errors="replace")


class ServeModel:
    """`mlgate serve-model cellar`, a process of its own on the service's registry and database."""

    def __init__(self, clone: Path, logs: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logs / "serve-model.log"
        self.log = open(self.log_path, "wb")
        import os

        clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLGATE_", "MLFLOW_", "GITHUB_"))}
        self.process = subprocess.Popen([sys.executable, "-m", "triggers.cli", "--config", str(clone / "mlgate.yaml"),
                                         "serve-model", MODEL, "--port", str(self.port), "--poll-seconds", "1",
                                         "--no-inference-log"], stdout=self.log, stderr=subprocess.STDOUT,
                                        cwd=clone, env=clean | JOB_THREADS)

    def health(self) -> dict[str, Any]:
        try:
            return httpx.get(self.url + "/healthz", timeout=10).json()
        except (httpx.HTTPError, ValueError):
            return {}

    def serves(self, version: str) -> bool:
        """Ready, serving `version` as production, and answering with it."""
        health = self.health()
        return health.get("status") == "ok" and health.get("version") == version and self.answers() == version

    def answers(self) -> str | None:
        """The version that answers a prediction now."""
        wines = wine_frame().drop(columns="cultivar").head(2).to_dict("records")   # as a client sends a CSV's rows
        answer = httpx.post(self.url + "/predict", json={"inputs": wines}, timeout=10).json()
        return answer["version"] if len(answer.get("predictions", [])) == 2 else None

    def stop(self) -> str:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()
        return self.log_path.read_text(errors="replace")[-4000:]


def push_webhook(service: Service, before: str, after: str, commits: list[tuple[str, list[str]]]) -> httpx.Response:
    """GitHub's push webhook for `before..after` on main (a real payload, its commits and files replaced)."""
    payload = copy.deepcopy(next(p for p in webhook_examples("push") if p["ref"] == "refs/heads/master"))
    payload["ref"], payload["before"], payload["after"] = "refs/heads/main", before, after
    payload["repository"]["full_name"], payload["repository"]["default_branch"] = REPOSITORY, "main"
    template = payload["commits"][0]
    payload["commits"] = [template | {"id": sha, "added": [], "removed": [], "modified": files}
                          for sha, files in commits]
    payload["head_commit"] = payload["commits"][-1]
    body = json.dumps(payload).encode()
    return httpx.post(service.url + "/webhooks/github", content=body, timeout=10, headers={
        "X-GitHub-Event": "push", "X-GitHub-Delivery": str(uuid.uuid4()), "Content-Type": "application/json",
        "X-Hub-Signature-256": sign(SECRET, body)})


class Project:
    """The remote, a developer's clone, and what the service's database and registry say."""

    def __init__(self, tmp_path: Path, mlflow_template: Path) -> None:
        from automation import tracking
        from automation.config import load_config

        self.remote, self.developer, self.clone = tmp_path / "remote.git", tmp_path / "developer", tmp_path / "service"
        sh(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(self.remote))
        csv = tmp_path / "wines.csv"   # the user's data, outside the repository
        wine_frame().to_csv(csv, index=False)
        git_commit(self.developer, project_files("models") | {
            f"{MODEL}.py": USER_MODEL.read_text(encoding="utf-8"),
            "mlgate.yaml": yaml.safe_dump(project_config(3600, csv)),
            ".gitignore": "state/\n*.log\n"}, message="the project's models")
        git(self.developer, "remote", "add", "origin", str(self.remote))
        git(self.developer, "push", "-q", "-u", "origin", "main")
        sh(tmp_path, "git", "clone", "-q", str(self.remote), str(self.clone))
        seed_mlflow_store(self.clone / "state", mlflow_template)
        self.config = load_config(self.clone / "mlgate.yaml")
        self.client = tracking.connect(self.config.workdir, self.config.experiment)[0]
        self._engine: Any = None

    @property
    def engine(self) -> Any:
        if self._engine is None:
            from automation import proposals, promote, store  # noqa: F401  (their tables)

            self._engine = store.open_store(store.database_url(self.config.workdir))
        return self._engine

    def head(self, ref: str = "refs/heads/main") -> str:
        return git(self.remote, "rev-parse", ref)

    def commit_and_push(self, files: dict[str, str], message: str) -> tuple[str, str]:
        """(before, after) of main."""
        git(self.developer, "pull", "-q", "--ff-only", "origin", "main")
        before = self.head()
        for name, text in files.items():
            (self.developer / name).write_text(text, encoding="utf-8")
            git(self.developer, "add", name)
        git(self.developer, "commit", "-qm", message)
        git(self.developer, "push", "-q", "origin", "main")
        return before, self.head()

    def retrain_change(self, note: str) -> tuple[str, str]:
        source = (self.developer / f"{MODEL}.py").read_text(encoding="utf-8")
        return self.commit_and_push({f"{MODEL}.py": source + f"# {note}\n"}, note)

    def merge_promotion(self, number: int) -> tuple[str, str, list[tuple[str, list[str]]]]:
        """What GitHub's merge button does: a merge commit of the promotion branch into main. (before, after, the
        commits the push webhook lists)."""
        git(self.developer, "fetch", "-q", "origin")
        git(self.developer, "checkout", "-q", "main")
        git(self.developer, "merge", "-q", "--ff-only", "origin/main")
        before = self.head()
        promotion = git(self.developer, "rev-parse", f"origin/{BRANCH}")
        git(self.developer, "merge", "-q", "--no-ff", "-m", f"Merge pull request #{number} from {BRANCH}",
            f"origin/{BRANCH}")
        git(self.developer, "push", "-q", "origin", "main")
        after = self.head()
        return before, after, [(promotion, [DEPLOY]), (after, [DEPLOY])]

    def declared(self, ref: str = "refs/heads/main") -> dict[str, Any] | None:
        done = subprocess.run(["git", "show", f"{ref}:{DEPLOY}"], cwd=self.remote, capture_output=True, text=True)
        return yaml.safe_load(done.stdout) if done.returncode == 0 else None

    def production(self) -> str | None:
        from automation import promote

        return promote.alias_version(self.client, MODEL, promote.PRODUCTION)

    def audit(self) -> list[tuple[str, str]]:
        from automation import promote

        return [(r.action, r.version) for r in promote.audit_trail(self.engine, MODEL)]

    def proposals(self) -> list[Any]:
        from automation import proposals

        return sorted(proposals.recent_proposals(self.engine), key=lambda p: p.id)

    def digest(self, version: str, scratch: Path) -> str:
        from automation.deploy_file import version_digest

        return version_digest(MODEL, version, scratch)


def prism_requests(log_path: Path) -> list[tuple[str, str, int | None]]:
    """(method, path, status answered) of each request Prism received, in order."""
    requests: list[list[Any]] = []
    for line in re.sub(r"\x1b\[[0-9;]*m", "", log_path.read_text(errors="replace")).splitlines():
        received = re.search(r"\[HTTP SERVER\] (\w+) (\S+) .*Request received", line)
        answered = re.search(r"Responding with the requested status code (\d+)", line)
        if received:
            requests.append([received.group(1).upper(), received.group(2), None])
        elif answered and requests and requests[-1][2] is None:
            requests[-1][2] = int(answered.group(1))
    return [(method, path, status) for method, path, status in requests]


def run_job(service: Service, project: Project, note: str) -> dict[str, Any]:
    """A developer's push that touches the model, its signed webhook, the job it starts, run to its end."""
    before, after = project.retrain_change(note)
    response = push_webhook(service, before, after, [(after, [f"{MODEL}.py"])])
    assert response.status_code == 202, response.text
    [job_id] = response.json()["jobs"]
    assert wait_for(lambda: service.finished(job_id), 300, interval=0.25), service.job(job_id)
    job = service.job(job_id)
    assert job["state"] == "succeeded" and job["sha"] == after, job
    return job


def proposal(service: Service, version: str, state: str = "opened") -> dict[str, Any] | None:
    return next((p for p in service.gitops()["proposals"] if p["version"] == version and p["state"] == state), None)


def test_promotion_by_pull_request_merge_revert_drift_and_restarts(tmp_path: Path, mlflow_template: Path,
                                                                   prism: tuple[str, Path]) -> None:
    from automation import promote

    prism_url, prism_log = prism
    project = Project(tmp_path, mlflow_template)
    services: list[Service] = []
    serving: ServeModel | None = None

    def start() -> Service:
        service = Service(project.clone, tmp_path / f"run{len(services)}", prism_url)
        services.append(service)
        assert wait_for(service.ready, 90), service.log_text()[-3000:]
        return service

    try:
        service = start()
        # 1. a push that touches the model: the job trains, gates and proposes, and promotes nothing. The service
        # is killed (SIGKILL) the moment the job is seen finished, before or while it publishes, and started again
        job = run_job(service, project, "first")
        service.kill()
        [killed] = project.proposals()
        assert job["version"] == "1" and project.production() is None and killed.state in ("pending", "pushed",
                                                                                           "opened")
        service = start()
        assert wait_for(lambda: proposal(service, "1"), 60), (service.gitops(), service.log_text()[-3000:])
        first = proposal(service, "1")
        assert first["kind"] == "promote" and first["job_id"] == job["id"] and first["branch"] == BRANCH
        assert first["pr_number"] == 1347   # the number in the spec's example answer: Prism took the calls
        # the branch is main plus one commit that changes the deploy file alone; main declares nothing yet
        assert git(project.remote, "rev-list", "--count", f"refs/heads/main..refs/heads/{BRANCH}") == "1"
        assert git(project.remote, "diff", "--name-only", f"refs/heads/main...refs/heads/{BRANCH}") == DEPLOY
        assert git(project.remote, "rev-parse", f"refs/heads/{BRANCH}") == first["commit_sha"]
        proposed = project.declared(f"refs/heads/{BRANCH}")
        assert proposed["version"] == "1" and proposed["digest"] == project.digest("1", tmp_path / "d1")
        assert proposed["evidence"]["job_id"] == job["id"] and proposed["evidence"]["commit"] == job["sha"]
        gates = {g["name"]: g["status"] for g in proposed["evidence"]["gates"]}
        assert "failed" not in gates.values() and gates.get("min accuracy") == "passed", gates
        assert project.declared() is None and project.production() is None and project.audit() == []

        # 2. the merge's push webhook moves production to v1
        before, merged, commits = project.merge_promotion(1347)
        response = push_webhook(service, before, merged, commits)
        assert response.status_code == 200 and response.json()["status"] == "no_models", response.text
        assert wait_for(lambda: project.production() == "1", 60), service.gitops()
        assert wait_for(lambda: service.gitops()["last"]["head"] == merged, 30), service.gitops()
        assert project.audit() == [("git", "1")] and proposal(service, "1", "done")
        # a push that declares nothing new wakes a reconcile of its head as well (the timer is an hour), and moves
        # nothing: no proposal is open now, so the push alone can have woken it
        before, notes = project.commit_and_push({"NOTES.md": "Production is in deploy/.\n"}, "notes")
        assert push_webhook(service, before, notes, [(notes, ["NOTES.md"])]).status_code == 200
        assert wait_for(lambda: service.gitops()["last"]["head"] == notes, 30), service.gitops()
        assert [(s["declared"], s["outcome"]) for s in service.gitops()["last"]["states"]] == [("1", "in_sync")]
        assert project.audit() == [("git", "1")]

        # 3. serve-model serves what git declares, the version and its digest
        serving = ServeModel(project.clone, tmp_path)
        assert wait_for(lambda: serving.serves("1"), 120), (serving.health(), serving.log_path.read_text()[-3000:])

        # 4. a second push: v2 proposed on the promotion branch (main plus one commit again), merged, served
        job = run_job(service, project, "second")
        assert job["version"] == "2"
        assert wait_for(lambda: proposal(service, "2"), 60), service.gitops()
        assert project.declared(f"refs/heads/{BRANCH}")["version"] == "2" and project.production() == "1"
        assert git(project.remote, "rev-list", "--count", f"refs/heads/main..refs/heads/{BRANCH}") == "1"
        before, merged, commits = project.merge_promotion(1347)
        assert push_webhook(service, before, merged, commits).status_code == 200
        assert wait_for(lambda: project.production() == "2", 60), service.gitops()
        assert wait_for(lambda: serving.serves("2"), 120), serving.health()
        assert project.audit() == [("git", "1"), ("git", "2")]

        # 5. rollback is a revert of the merge, pushed; the service is killed as soon as its webhook is accepted
        # (no proposal is open: only the push wakes the reconcile). Restarted, it reconciles every 2 s.
        git(project.developer, "revert", "-m", "1", "--no-edit", merged)
        git(project.developer, "push", "-q", "origin", "main")
        reverted = project.head()
        response = push_webhook(service, merged, reverted, [(reverted, [DEPLOY])])
        service.kill()
        assert response.status_code == 200, response.text
        config = yaml.safe_load((project.clone / "mlgate.yaml").read_text())
        config["service"]["gitops"]["reconcile_seconds"] = 2
        (project.clone / "mlgate.yaml").write_text(yaml.safe_dump(config))
        service = start()
        assert wait_for(lambda: project.production() == "1", 60), service.gitops()
        assert wait_for(lambda: serving.serves("1"), 120), serving.health()
        assert project.audit() == [("git", "1"), ("git", "2"), ("git", "1")]

        # 6. an alias moved by hand is counted as drift and put back by the timer's reconcile; serve-model keeps
        # answering with the declared version meanwhile (it refuses to load one git does not declare), and stays
        # ready: serving what git declares is production for a GitOps model
        project.client.set_registered_model_alias(MODEL, promote.PRODUCTION, "2")
        assert wait_for(lambda: project.production() == "1", 60), service.gitops()
        assert serving.answers() == "1" and wait_for(lambda: serving.serves("1"), 30), serving.health()
        restored = promote.audit_trail(project.engine, MODEL)[-1]
        assert (restored.action, restored.version) == ("git", "1") and restored.reason.startswith("drift restored")
        metrics = service.get("/metrics").text
        assert 'mlgate_gitops_drift_events_total{model="cellar",outcome="drift_restored",stage="production"} ' \
               '1.0' in metrics, [m for m in metrics.splitlines() if "gitops" in m]
        card = next(m for m in service.get("/models").json() if m["model"] == MODEL)["gitops"]
        assert card["mode"] == "pull_request" and card["head"] == reverted and not card["refused"]
        assert [(s["declared"], s["outcome"]) for s in card["stages"]] in ([("1", "in_sync")],
                                                                          [("1", "drift_restored")])

        # 7. one audit row per move (three merges and reverts, one restored drift), one proposal per job, merged;
        # every GitHub call in the contract (Prism answers 422 otherwise), one pull request opened per proposal
        # (looked up first: on GitHub the lookup finds one a killed publisher opened; Prism's example never does)
        assert project.audit() == [("git", "1"), ("git", "2"), ("git", "1"), ("git", "1")]
        done = project.proposals()
        assert [(p.version, p.state, p.pr_number) for p in done] == [("1", "done", 1347), ("2", "done", 1347)]
        requests = prism_requests(prism_log)
        assert requests and all(status is not None and 200 <= status < 300 for _, _, status in requests), [
            r for r in requests if r[2] is None or not 200 <= r[2] < 300]
        pulls = f"/repos/{REPOSITORY}/pulls"
        opens = [i for i, (method, path, _) in enumerate(requests) if (method, path) == ("POST", pulls)]
        assert all(requests[i - 1][:2] == ("GET", pulls) for i in opens), requests
        assert len(opens) == 2 or (len(opens) == 3 and killed.state == "pushed"), (killed, requests)
        statuses = {path.rsplit("/", 1)[1] for method, path, _ in requests if method == "POST" and "/statuses/" in path}
        assert {p.commit_sha for p in done} <= statuses       # the evidence on each promotion commit
        assert {merged, reverted} <= statuses                  # the mlgate/deploy verdict on reconciled heads
    finally:
        if serving is not None:
            print(serving.stop())
        for service in services:
            if service.process.poll() is None:
                print(service.stop()[-3000:])


class GitHubThatFails:
    """GitHub as the publisher sees it, for one repository, unreachable while `down` (the contract itself is
    checked against Prism above): records the calls it answered."""

    is_app = False

    def __init__(self) -> None:
        self.down = False
        self.calls: list[tuple[Any, ...]] = []

    def _answer(self, *call: Any) -> None:
        from triggers.github.api import GitHubUnavailable

        if self.down:
            raise GitHubUnavailable("GitHub answered 502", status=502)
        self.calls.append(call)

    def find_pull_request(self, repository: str, branch: str, base: str) -> int | None:
        self._answer("find", branch)
        return None

    def open_pull_request(self, repository: str, branch: str, base: str, title: str, body: str) -> int:
        self._answer("open", branch, body)
        return 7

    def update_pull_request(self, repository: str, number: int, title: str, body: str) -> None:
        self._answer("update", number)

    def commit_verdict(self, repository: str, sha: str, name: str, title: str, summary: str, passed: bool) -> None:
        self._answer("verdict", sha, name)


def test_a_change_is_published_after_its_job_and_github_down_stops_only_its_pull_request(
        tmp_path: Path, mlflow_template: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job records its proposal before it writes its report: the pull request waits for the job's end, so
    its body is the report. With GitHub down the branch is pushed once, the reconcile still runs (a merge by hand
    puts back an alias moved by hand), and the pull request is opened when GitHub answers again."""
    from automation import proposals, promote
    from automation.deploy_file import DeployFile
    from tests.gitops_repo import MODEL as OTHER, git as repo_git, make_repo
    from triggers.gitops import publish
    from triggers.gitops.loop import GitOpsLoop
    from triggers.gitops.publish import GitHubTarget
    from triggers.jobs import queue

    repo = make_repo(tmp_path, mlflow_template, mode="pull_request")
    v1, v2 = repo.register(b"one"), repo.register(b"two")
    github = GitHubThatFails()
    loop = GitOpsLoop(repo.config, repo.engine, repo.service, lambda: repo.client, GitHubTarget(github, "acme/models"))
    repo.declare(v1)
    job, _ = queue.enqueue(repo.engine, model=OTHER, kind="retrain", trigger="push")
    assert queue.claim(repo.engine, "worker", lease_seconds=600).id == job.id
    proposals.propose(repo.engine, DeployFile(model=OTHER, stage="production", version=v2, digest=repo.digest(v2)),
                      replaces=v1, job_id=job.id)
    branch = f"mlgate/promote/production/{OTHER}"

    def pushed() -> str | None:
        done = subprocess.run(["git", "rev-parse", "-q", "--verify", f"refs/heads/{branch}"], cwd=repo.remote,
                              capture_output=True, text=True)
        return done.stdout.strip() or None

    loop.pass_once()
    assert promote.alias_version(repo.client, OTHER, promote.PRODUCTION) == v1
    assert pushed() is None and [p.state for p in proposals.open_proposals(repo.engine)] == ["pending"]
    report = repo.config.workdir / "reports" / job.id / "report.md"
    report.parent.mkdir(parents=True)
    report.write_text("## fraud_scorer v2: the model report\n", encoding="utf-8")
    assert queue.finish(repo.engine, job.id, "worker", "succeeded")

    github.calls.clear()
    github.down = True
    monkeypatch.setattr(publish, "GITHUB_RETRY_SECONDS", (0.0, 0.0))   # no backoff to wait for here
    for _ in range(2):
        repo.client.set_registered_model_alias(OTHER, promote.PRODUCTION, v2)   # by hand, behind git's back
        published, result = loop.pass_once()
        assert result is not None and [s.outcome for s in result.states] == ["drift_restored"]
        assert promote.alias_version(repo.client, OTHER, promote.PRODUCTION) == v1   # though GitHub is down
    [waiting] = proposals.open_proposals(repo.engine)
    assert waiting.state == "pushed" and waiting.commit_sha == pushed() and github.calls == []
    assert repo_git(repo.remote, "rev-list", "--count", f"{waiting.commit_sha}^..{waiting.commit_sha}") == "1"

    github.down = False
    loop.pass_once()
    [opened] = [p for p in proposals.recent_proposals(repo.engine) if p.id == waiting.id]
    assert opened.state == "opened" and opened.pr_number == 7 and pushed() == waiting.commit_sha   # not pushed again
    assert [c[0] for c in github.calls if c[-1] != "mlgate/deploy"] == ["find", "open", "verdict"]
    assert github.calls[2] == ("verdict", waiting.commit_sha, "mlgate/promotion")
    body = next(c[2] for c in github.calls if c[0] == "open")
    assert "## fraud_scorer v2: the model report" in body and "Merging this pull request promotes" in body


def test_processes_sharing_a_clone_read_the_branch_head_at_the_same_time(tmp_path: Path) -> None:
    """The service's loop, serve-model and `mlgate reconcile` may fetch into one clone at once: git lets one of
    them update `refs/remotes/origin/main` and refuses the others ("cannot lock ref"), which must not fail them."""
    from concurrent.futures import ThreadPoolExecutor

    from triggers.gitops import git_tree

    remote, clone = tmp_path / "remote.git", tmp_path / "clone"
    sh(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(remote))
    git_commit(tmp_path / "developer", {"README.md": "0\n"})
    git(tmp_path / "developer", "push", "-q", str(remote), "main")
    sh(tmp_path, "git", "clone", "-q", str(remote), str(clone))
    with ThreadPoolExecutor(4) as pool:
        for round_ in range(1, 9):
            head = git_commit(tmp_path / "developer", {"README.md": f"{round_}\n"})
            git(tmp_path / "developer", "push", "-q", str(remote), "main")
            assert list(pool.map(lambda _: git_tree.branch_head(clone, "main"), range(4))) == [head] * 4
