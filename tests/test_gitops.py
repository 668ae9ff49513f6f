"""GitOps promotion without training: deploy files read from a real git repository with a bare remote, the real
MLflow registry (versions with real files), the reconciler, the publisher and serve-model's digest pin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from automation import proposals, promote
from automation.deploy_file import DeployFile, DeployRefused, deploy_path, parse_deploy_file
from tests.gitops_repo import MODEL, GitOpsRepo, git, make_repo
from triggers.gitops import git_tree
from triggers.gitops.publish import Publisher
from triggers.gitops.reconcile import Reconciler

DIGEST = "sha256:" + "ab" * 32
PATH = f"deploy/production/{MODEL}.yaml"


def file_text(**changes: Any) -> bytes:
    fields = {"model": MODEL, "stage": "production", "version": "3", "digest": DIGEST} | changes
    return DeployFile.model_construct(**fields).render().encode() if "raw" not in changes else changes["raw"]


@pytest.mark.parametrize("path,text,expected", [
    (PATH, file_text() + b"---\n" + file_text(version="4"), "2 YAML documents"),
    (f"deploy/{MODEL}.yaml", file_text(), "outside deploy/<stage>/<model>.yaml"),
    (f"deploy/production/team/{MODEL}.yaml", file_text(), "outside deploy/<stage>/<model>.yaml"),
    (f"deploy/canary/{MODEL}.yaml", file_text(), "outside deploy/<stage>/<model>.yaml"),
    (f"elsewhere/production/{MODEL}.yaml", file_text(), "outside deploy/<stage>/<model>.yaml"),
    ("deploy/production/other.yaml", file_text(), "may only declare other in production"),
    (PATH, file_text(stage="staging"), "may only declare"),
    (PATH, file_text(version="../1"), "version"),
    (PATH, file_text(version="0"), "version"),
    (PATH, file_text(digest="sha256:" + "z" * 64), "digest"),
    (PATH, file_text(digest="md5:abc"), "digest"),
    (PATH, file_text().replace(b"stage:", b"owner: mallory\nstage:"), "owner: Extra inputs are not permitted"),
    (PATH, b"\xff\xfe not utf-8", "not YAML"),
    (PATH, b"- a list\n- not a mapping\n", "(top level)"),
    (PATH, b"", "empty"),
    (PATH, b"model: x\n" + b"#" * 70_000, "more than a deploy file's"),
    ("deploy/production/m\u00e9t\u00e9o.yaml", file_text(model="m\u00e9t\u00e9o"), "not a model in mlgate.yaml"),
])
def test_a_deploy_file_that_declares_nothing_valid_is_refused_in_one_line(path: str, text: bytes,
                                                                         expected: str) -> None:
    with pytest.raises(DeployRefused) as refused:
        parse_deploy_file(path, text, "deploy", {MODEL, "other", "m\u00e9t\u00e9o"} - {"m\u00e9t\u00e9o"}
                          if "m\u00e9t\u00e9o" in path else {MODEL, "other"})
    message = str(refused.value)
    assert expected in message and "\n" not in message and message.startswith(path[:20]), message


def test_a_deploy_file_round_trips_through_its_text() -> None:
    declared = DeployFile(model=MODEL, stage="production", version="12", digest=DIGEST, variant="onnx_int8")
    assert parse_deploy_file(PATH, declared.render().encode(), "deploy", {MODEL}) == declared
    assert declared.render().startswith("# mlgate deploy file")


@pytest.fixture
def repo(tmp_path: Path, mlflow_template: Path) -> GitOpsRepo:
    return make_repo(tmp_path, mlflow_template)


def reconciler(repo: GitOpsRepo) -> Reconciler:
    return Reconciler(repo.config, repo.service, repo.engine, lambda: repo.client,
                      held=lambda model, stage: None)


def production(repo: GitOpsRepo) -> str | None:
    return promote.alias_version(repo.client, MODEL, promote.PRODUCTION)


def audit(repo: GitOpsRepo) -> list[tuple[str, str]]:
    return [(r.action, r.version) for r in promote.audit_trail(repo.engine, MODEL)]


def test_git_declares_production_revert_rolls_back_and_a_hand_moved_alias_is_put_back(repo: GitOpsRepo) -> None:
    v1, v2 = repo.register(b"first"), repo.register(b"second")
    loop = reconciler(repo)
    repo.declare(v1)
    first = loop.run()
    assert production(repo) == v1 and [s.outcome for s in first.states] == ["moved"] and not first.refused
    again = loop.run()   # the same head twice moves nothing
    assert [s.outcome for s in again.states] == ["in_sync"] and audit(repo) == [("git", v1)]

    promotion = repo.declare(v2)
    loop.run()
    assert production(repo) == v2 and promote.alias_version(repo.client, MODEL, promote.PREVIOUS) == v1
    git(repo.developer, "revert", "--no-edit", promotion)   # rollback is a revert
    git(repo.developer, "push", "-q", "origin", "main")
    reverted = loop.run()
    assert production(repo) == v1 and reverted.states[0].outcome == "moved" and reverted.head == repo.head()

    repo.client.set_registered_model_alias(MODEL, promote.PRODUCTION, v2)   # by hand, behind git's back
    drifted = loop.run()
    assert drifted.states[0].outcome == "drift_restored" and production(repo) == v1
    assert "moved outside git" in drifted.states[0].detail
    assert audit(repo) == [("git", v1), ("git", v2), ("git", v1), ("git", v1)]
    assert loop.run().states[0].outcome == "in_sync"


def test_drift_is_only_reported_when_the_policy_says_so(tmp_path: Path, mlflow_template: Path) -> None:
    from triggers.gitops.loop import GitOpsCollector, GitOpsLoop

    repo = make_repo(tmp_path, mlflow_template, on_drift="report")
    v1, v2 = repo.register(b"one"), repo.register(b"two")
    repo.declare(v1)
    loop = GitOpsLoop(repo.config, repo.engine, repo.service, lambda: repo.client, None)
    loop.pass_once()
    repo.client.set_registered_model_alias(MODEL, promote.PRODUCTION, v2)
    _, result = loop.pass_once()
    assert result is not None and result.states[0].outcome == "drift_reported" and production(repo) == v2
    metrics = {m.name: m for m in GitOpsCollector(loop).collect()}
    assert [(s.labels, s.value) for s in metrics["mlgate_gitops_drift"].samples] == [
        ({"model": MODEL, "stage": "production"}, 1.0)]
    assert loop.view()["last"]["states"][0]["outcome"] == "drift_reported"


def test_bad_deploy_files_are_refused_and_production_stays_where_it_was(repo: GitOpsRepo) -> None:
    v1, v2 = repo.register(b"good"), repo.register(b"other")
    loop = reconciler(repo)
    repo.declare(v1)
    loop.run()
    cases = {
        "a version that does not exist": (lambda: repo.declare("99", digest=repo.digest(v1)),
                                          "version 99 of fraud_scorer is not registered"),
        "a digest that does not match": (lambda: repo.declare(v2, digest=repo.digest(v1)),
                                         "does not match version 2"),
        "two models in one file": (lambda: repo.push_files({PATH: DeployFile(
            model=MODEL, stage="production", version=v2, digest=repo.digest(v2)).render() + "---\nmodel: other\n"}),
            "2 YAML documents"),
    }
    for what, (push, expected) in cases.items():
        head = push()
        result = loop.run()
        assert result.head == head and production(repo) == v1, what
        assert len(result.refused) == 1 and expected in result.refused[0], (what, result.refused)
    # a file outside the folder's layout, and a link in it: refused, and the valid declaration still applies
    repo.push_files({PATH: DeployFile(model=MODEL, stage="production", version=v1, digest=repo.digest(v1)).render(),
                     "deploy/fraud_scorer.yaml": "version: '2'\n"})
    (repo.developer / "deploy" / "production" / "linked.yaml").symlink_to("/etc/passwd")
    git(repo.developer, "add", "deploy/production/linked.yaml")
    git(repo.developer, "commit", "-qm", "a link")
    git(repo.developer, "push", "-q", "origin", "main")
    result = loop.run()
    assert production(repo) == v1 and sorted(r.split(":")[0] for r in result.refused) == [
        "deploy/fraud_scorer.yaml", "deploy/production/linked.yaml"]
    assert [("git", v1)] == audit(repo)


def test_commit_mode_publishes_once_even_when_the_service_dies_after_pushing(repo: GitOpsRepo,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = repo.register(b"weights")
    declared = DeployFile(model=MODEL, stage="production", version=v1, digest=repo.digest(v1))
    proposal = proposals.propose(repo.engine, declared, replaces=None, job_id="job1")
    publisher = Publisher(repo.config, repo.service, repo.engine, None)
    before = repo.head()

    def died(*args: Any, **kwargs: Any) -> bool:
        raise SystemExit("the service died between the push and its bookkeeping")

    monkeypatch.setattr(proposals, "settle", died)
    with pytest.raises(SystemExit):
        publisher.run()
    monkeypatch.undo()
    pushed = repo.head()
    assert pushed != before and git(repo.remote, "show", f"{pushed}:{PATH}") == declared.render().rstrip("\n")
    assert [p.state for p in proposals.open_proposals(repo.engine)] == ["pending"]
    lines = Publisher(repo.config, repo.service, repo.engine, None).run()   # the restarted service
    assert repo.head() == pushed and lines == [f"{MODEL} v{v1} is declared in production at {pushed[:12]}"]
    assert proposals.open_proposals(repo.engine) == [] and proposal.id
    reconciler(repo).run()
    assert production(repo) == v1 and audit(repo) == [("git", v1)]


def test_a_stale_proposal_is_dropped_when_git_moved_since_the_gate(repo: GitOpsRepo) -> None:
    v1, v2, v3 = repo.register(b"1"), repo.register(b"2"), repo.register(b"3")
    repo.declare(v2)   # a person promoted v2 while the job gated v3 against v1
    stale = proposals.propose(repo.engine, DeployFile(model=MODEL, stage="production", version=v3,
                                                      digest=repo.digest(v3)), replaces=v1)
    head = repo.head()
    lines = Publisher(repo.config, repo.service, repo.engine, None).run()
    assert repo.head() == head and "production moved to v2 in git" in lines[0]
    assert [p for p in proposals.recent_proposals(repo.engine) if p.id == stale.id][0].state == "superseded"


def test_pull_request_mode_pushes_the_promotion_branch_and_one_pull_request(tmp_path: Path,
                                                                          mlflow_template: Path) -> None:
    from triggers.gitops.publish import GitHubTarget

    repo = make_repo(tmp_path, mlflow_template, mode="pull_request")
    v1, v2 = repo.register(b"a"), repo.register(b"b")
    github = RecordingGitHub()
    for version in (v1, v2):   # the second change goes on the same branch and pull request
        proposals.propose(repo.engine, DeployFile(model=MODEL, stage="production", version=version,
                                                  digest=repo.digest(version)), replaces=None, job_id=f"job{version}")
        Publisher(repo.config, repo.service, repo.engine, GitHubTarget(github, "acme/models")).run()
    branch = f"mlgate/promote/production/{MODEL}"
    assert git_tree.file_at(repo.remote, f"refs/heads/{branch}", PATH, 65536) is not None
    assert f"version: '{v2}'" in git(repo.remote, "show", f"refs/heads/{branch}:{PATH}")
    assert [c[0] for c in github.calls] == ["find", "open", "verdict", "find", "update", "verdict"]
    assert github.calls[1][1:3] == (branch, "main") and "Merging this pull request promotes" in github.calls[1][4]
    assert git_tree.file_at(repo.remote, "refs/heads/main", PATH, 65536) is None   # nothing moves before a merge
    assert production(repo) is None


class RecordingGitHub:
    """The calls the publisher makes, answered as GitHub would for one repository (the contract itself is checked
    against Prism in test_gitops_e2e.py)."""

    is_app = False

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.pulls: dict[str, int] = {}

    def find_pull_request(self, repository: str, branch: str, base: str) -> int | None:
        self.calls.append(("find", branch, base))
        return self.pulls.get(branch)

    def open_pull_request(self, repository: str, branch: str, base: str, title: str, body: str) -> int:
        self.calls.append(("open", branch, base, title, body))
        self.pulls[branch] = 7
        return 7

    def update_pull_request(self, repository: str, number: int, title: str, body: str) -> None:
        self.calls.append(("update", number, title))

    def commit_verdict(self, repository: str, sha: str, name: str, title: str, summary: str, passed: bool) -> None:
        self.calls.append(("verdict", sha, name, passed))


def test_serve_model_loads_only_the_declared_version_with_the_declared_digest(repo: GitOpsRepo) -> None:
    from triggers.serving.server import ModelServer, NotDeclared, ProbeFailed

    v1, v2 = repo.register(b"declared"), repo.register(b"tampered")
    server = ModelServer(repo.config, MODEL)
    server._mlflow = repo.client
    with pytest.raises(NotDeclared, match="declares nothing"):
        server.load(v1)
    repo.declare(v1)
    with pytest.raises(NotDeclared, match="git declares version 1"):
        server.load(v2)
    repo.declare(v1, digest=repo.digest(v2))   # the registry's files are not what git pinned
    with pytest.raises(ProbeFailed, match="behind git's back"):
        server.load(v1)


def test_deploy_paths_from_config_stay_inside_the_repository(tmp_path: Path) -> None:
    from automation.config import GitOpsConfig

    for bad in ("../deploy", "/etc", "deploy/../../x", "./deploy"):
        with pytest.raises(ValueError):
            GitOpsConfig(folder=bad)
    assert deploy_path("deploy", "production", MODEL) == PATH


def test_staging_then_production_the_production_change_carries_the_staging_evidence(
        tmp_path: Path, mlflow_template: Path) -> None:
    """Staging is declared in git like production; serve-model --stage staging proposes production once its
    rollout passed (with the analysis), and a staging rollout that fails puts staging back and tells git."""
    import yaml

    from automation.config import ModelConfig
    from triggers.gitops.loop import held_rollbacks
    from triggers.serving.rollout import RolloutView
    from triggers.serving.server import ModelServer

    with pytest.raises(ValueError, match="needs a rollout: block"):
        ModelConfig(module="models.digits_mlp", promotion={"mode": "commit", "stages": ["staging", "production"]})
    repo = make_repo(tmp_path, mlflow_template, stages=["staging", "production"])
    v1, v2 = repo.register(b"staged"), repo.register(b"next")
    repo.push_files({f"deploy/staging/{MODEL}.yaml": DeployFile(model=MODEL, stage="staging", version=v1,
                                                                digest=repo.digest(v1)).render()})
    loop = reconciler(repo)
    loop.run()
    assert promote.alias_version(repo.client, MODEL, promote.STAGING) == v1 and production(repo) is None

    server = ModelServer(repo.config, MODEL, stage="staging")
    server._mlflow = repo.client
    server._propose_production(v1, {"analysis": {"state": "done", "comparison": {"agreement": 0.99}},
                                    "reason": "version 1 passed every stage"})
    publisher = Publisher(repo.config, repo.service, repo.engine, None)
    publisher.run()
    declared = yaml.safe_load(git(repo.remote, "show", f"refs/heads/main:{PATH}"))
    assert declared["stage"] == "production" and declared["version"] == v1
    assert declared["evidence"]["rollout"]["analysis"]["comparison"] == {"agreement": 0.99}
    loop.run()
    assert production(repo) == v1 and promote.alias_version(repo.client, MODEL, promote.STAGING) == v1

    # v2 into staging, its rollout fails: staging goes back to v1 at once, git follows through a proposal
    repo.push_files({f"deploy/staging/{MODEL}.yaml": DeployFile(model=MODEL, stage="staging", version=v2,
                                                                digest=repo.digest(v2)).render()})
    loop.run()
    server._roll_back(RolloutView(1, f"{MODEL}@staging", v1, v2, 0, "rolled_back", "", 0.0),
                      "agreement 0.41 below 0.95")
    assert promote.alias_version(repo.client, MODEL, promote.STAGING) == v1
    held = Reconciler(repo.config, repo.service, repo.engine, lambda: repo.client,
                      held=held_rollbacks(repo.engine)).run()
    assert [s.outcome for s in held.states if s.stage == "staging"] == ["held"]   # not drift: git will follow
    publisher.run()
    staged = yaml.safe_load(git(repo.remote, "show", f"refs/heads/main:deploy/staging/{MODEL}.yaml"))
    assert staged["version"] == v1 and "agreement 0.41" in staged["evidence"]["rolled_back"]
    assert [s.outcome for s in loop.run().states] == ["in_sync", "in_sync"] and production(repo) == v1


def test_a_manual_promote_of_a_git_declared_model_is_refused_with_the_file_to_change(
        repo: GitOpsRepo, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import error_lines, run_cli

    v1 = repo.register(b"x")
    config = str(repo.service / "mlgate.yaml")
    for argv in (["promote", MODEL, v1], ["rollback", MODEL]):
        code, _, err = run_cli(capsys, "--config", config, *argv, "--reason", "hotfix")
        assert code == 2 and error_lines(err)[0].startswith(f"Error: git declares {MODEL}'s production"), err
        assert PATH in err
    assert production(repo) is None and audit(repo) == []
    code, out, _ = run_cli(capsys, "--config", config, "reconcile", "--json")   # nothing declared yet: nothing moves
    assert code == 0 and '"states": []' in out


@pytest.mark.parametrize("name", ["my model", "../x", "a..b", "x.lock.", "x.lock", "mod\u00e8le", ".hidden", "a/b"])
def test_a_git_promoted_model_needs_a_name_git_can_take(tmp_path: Path, name: str) -> None:
    import yaml

    from automation.config import parse_config
    from automation.errors import UsageError

    raw = {"models": {name: {"module": "models.digits_mlp", "promotion": {"mode": "commit"}}}}
    with pytest.raises(UsageError, match="names a deploy file and a branch"):
        parse_config(yaml.safe_dump(raw), "mlgate.yaml", tmp_path)
    raw["models"][name]["promotion"]["mode"] = "registry"   # the registry takes any name, as before
    assert name in parse_config(yaml.safe_dump(raw), "mlgate.yaml", tmp_path).models


def test_two_replicas_publishing_at_once_open_one_pull_request(tmp_path: Path, mlflow_template: Path,
                                                              postgres_url: str) -> None:
    """Two services on one PostgreSQL job database publish the same proposal at the same moment: one pushes and
    opens the pull request, the other finds it done."""
    import threading
    import time

    from sqlalchemy import delete

    from automation import store
    from triggers.gitops.publish import GitHubTarget

    repo = make_repo(tmp_path, mlflow_template, mode="pull_request")
    engine = store.open_store(postgres_url)
    with engine.begin() as conn:
        conn.execute(delete(proposals.Proposal))
    v1 = repo.register(b"w")
    proposals.propose(engine, DeployFile(model=MODEL, stage="production", version=v1, digest=repo.digest(v1)),
                      replaces=None)
    github = RecordingGitHub()
    slow_find = github.find_pull_request

    def find_slowly(*args: Any) -> int | None:   # widens the window in which two publishers could both open one
        found = slow_find(*args)
        time.sleep(0.5)
        return found

    github.find_pull_request = find_slowly   # type: ignore[method-assign]
    start = threading.Barrier(2)

    def replica() -> None:
        start.wait()
        Publisher(repo.config, repo.service, engine, GitHubTarget(github, "acme/models")).run()

    threads = [threading.Thread(target=replica) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [c[0] for c in github.calls] == ["find", "open", "verdict"], github.calls
    assert [p.state for p in proposals.recent_proposals(engine)] == ["opened"]


def test_a_move_whose_mover_died_is_settled_before_the_reconciler_reads_production(repo: GitOpsRepo) -> None:
    """The service died between moving the alias and writing its audit row: the next pass writes the row (once)
    and reports the model in sync, instead of moving it again or leaving the move unaudited."""
    from datetime import timedelta

    from sqlalchemy import update

    from automation.store import utc_now

    v1 = repo.register(b"one")
    repo.declare(v1)
    intent = promote._begin(repo.engine, repo.client, MODEL, "git", v1, "git: died mid-move", None, None)
    promote._end(repo.engine, intent, "moving", version=v1, replaced_version=None)
    repo.client.set_registered_model_alias(MODEL, promote.PRODUCTION, v1)   # moved; the audit row never written
    with repo.engine.begin() as conn:   # the mover died three minutes ago
        conn.execute(update(promote.PromotionIntent).where(promote.PromotionIntent.id == intent)
                     .values(created_at=utc_now() - timedelta(minutes=3)))
    result = reconciler(repo).run()
    assert [s.outcome for s in result.states] == ["in_sync"] and audit(repo) == [("git", v1)]


def test_a_refused_deploy_file_fails_the_deploy_check_on_its_commit_once(repo: GitOpsRepo) -> None:
    from triggers.gitops.loop import GitOpsLoop
    from triggers.gitops.publish import GitHubTarget

    v1 = repo.register(b"ok")
    github = RecordingGitHub()
    loop = GitOpsLoop(repo.config, repo.engine, repo.service, lambda: repo.client, GitHubTarget(github, "acme/m"))
    good = repo.declare(v1)
    loop.pass_once()
    bad = repo.declare("42", digest=repo.digest(v1))
    loop.pass_once()
    loop.pass_once()   # the same head again: no second verdict
    assert github.calls == [("verdict", good, "mlgate/deploy", True), ("verdict", bad, "mlgate/deploy", False)]
    assert production(repo) == v1


@pytest.mark.parametrize("prefix", ["../x", "a..b", "/mlgate", "mlgate/", "a//b", "x.lock/y", "pro\u00e9mote", ".x"])
def test_a_promotion_branch_prefix_git_would_refuse_is_refused_at_config_load(prefix: str) -> None:
    from automation.config import GitOpsConfig

    with pytest.raises(ValueError):
        GitOpsConfig(branch_prefix=prefix)
    assert GitOpsConfig(branch_prefix="team.ml/promote").branch_prefix == "team.ml/promote"


@pytest.mark.parametrize("tag,expected", [(None, {}), ("not json", {}), ('["a list"]', {}), ("7", {}),
                                          ('{"job_id": "j1", "commit": "abc"}', {"job_id": "j1", "commit": "abc"})])
def test_a_versions_evidence_tag_is_read_leniently(tag: str | None, expected: dict[str, str]) -> None:
    """A hand-edited or missing tag must not stop serving's rollback from being proposed to git."""
    from triggers.serving.server import version_evidence

    assert version_evidence({} if tag is None else {"mlgate.evidence": tag}) == expected
