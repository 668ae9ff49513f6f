"""The GitHub REST API through PyGithub, as the service uses it: file lists, file contents,
workflow dispatch. Honors GITHUB_API_URL (GitHub Enterprise, or a contract-test server)
and GITHUB_TOKEN; the token never reaches a log line or an error message."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from automation.errors import MlgateError
from automation.redaction import redact

DEFAULT_API_URL = "https://api.github.com"
MAX_CHECK_TEXT = 65_535   # a check run output's summary and text, each
MAX_PR_BODY = 65_536      # GitHub's limit on a pull request's body
# the JSON media type by name: some endpoints list another first, which some servers and mocks cannot produce
JSON_ACCEPT = {"Accept": "application/json"}


class GitHubUnavailable(MlgateError):
    """The API could not answer (network, auth, rate limit, 5xx) or refused (4xx): callers say so."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class GitHubRateLimited(MlgateError):
    """GitHub said "not now" (rate limit, primary or secondary). Not a GitHubUnavailable on purpose: no
    caller may take it for a "no" (fail closed); the caller parks the work until `retry_at`."""

    def __init__(self, message: str, retry_at: float) -> None:
        super().__init__(message)
        self.retry_at = retry_at


def _retry_at(headers: dict[str, str] | None) -> float:
    """When GitHub says to come back: Retry-After, else the limit's reset, else in a minute."""
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    now = time.time()
    try:
        if "retry-after" in headers:
            return now + float(headers["retry-after"])
        if headers.get("x-ratelimit-remaining") == "0" and "x-ratelimit-reset" in headers:
            return max(now, float(headers["x-ratelimit-reset"]))
    except ValueError:
        pass
    return now + 60.0


ACTIONS_BOT = "github-actions[bot]"


def is_own_comment(body: str | None, author: str | None, marker: str, own_login: str) -> bool:
    return marker in (body or "") and author is not None and author.lower() == own_login.lower()


@dataclass(frozen=True)
class GitHubApp:
    """The service running as a GitHub App: installation tokens minted from the app's private key (PyGithub
    renews them before they expire). Its jobs then show as check runs (triggers/github/check_runs.py)."""
    app_id: str
    private_key: str = field(repr=False)
    installation_id: int

    @classmethod
    def from_env(cls) -> "GitHubApp | None":
        """GITHUB_APP_ID, GITHUB_APP_INSTALLATION_ID and GITHUB_APP_PRIVATE_KEY (PEM) or
        GITHUB_APP_PRIVATE_KEY_FILE; None when GITHUB_APP_ID is unset."""
        app_id = os.environ.get("GITHUB_APP_ID", "").strip()
        if not app_id:
            return None
        key = os.environ.get("GITHUB_APP_PRIVATE_KEY") or ""
        key_file = os.environ.get("GITHUB_APP_PRIVATE_KEY_FILE")
        if not key and key_file:
            try:
                key = open(key_file, encoding="utf-8").read()
            except OSError as exc:
                raise MlgateError(f"GITHUB_APP_PRIVATE_KEY_FILE cannot be read: {exc.strerror}") from None
        installation = os.environ.get("GITHUB_APP_INSTALLATION_ID", "").strip()
        if not key or not installation.isdigit() or not app_id.isdigit():
            raise MlgateError("GITHUB_APP_ID is set, so GITHUB_APP_INSTALLATION_ID (a number) and "
                              "GITHUB_APP_PRIVATE_KEY or GITHUB_APP_PRIVATE_KEY_FILE (PEM) must be too")
        return cls(app_id, key, int(installation))


@dataclass
class GitHubSource:
    api_url: str
    token: str | None
    timeout: float = 10.0
    app: GitHubApp | None = None
    _login: str | None = field(default=None, repr=False)
    _auth: Any = field(default=None, repr=False)

    @classmethod
    def from_env(cls) -> "GitHubSource":
        return cls(api_url=os.environ.get("GITHUB_API_URL") or DEFAULT_API_URL,
                   token=os.environ.get("GITHUB_TOKEN") or None, app=GitHubApp.from_env())

    @property
    def is_app(self) -> bool:
        return self.app is not None

    def _credentials(self) -> Any:
        from github import Auth

        if self.app is not None:
            return Auth.Token(self._installation_token())
        if self._auth is None and self.token:
            self._auth = Auth.Token(self.token)
        return self._auth

    def _installation_token(self) -> str:
        """The app installation's token, minted with a JWT signed by the app's key and kept until 5 minutes
        before it expires (an hour, on GitHub). Asked for as plain JSON: PyGithub's own request names a
        retired preview media type."""
        from datetime import datetime

        from github import Auth, Github

        token, expires = self._auth or (None, 0.0)
        if token is None or expires - 300 < time.time():
            app = self.app
            assert app is not None
            signer = Github(base_url=self.api_url, auth=Auth.AppAuth(app.app_id, app.private_key),
                            timeout=int(self.timeout), lazy=True)
            _, data = signer.requester.requestJsonAndCheck(
                "POST", f"/app/installations/{app.installation_id}/access_tokens", headers=JSON_ACCEPT)
            token = str((data or {})["token"])
            try:
                expires = datetime.fromisoformat(str(data["expires_at"]).replace("Z", "+00:00")).timestamp()
            except (KeyError, ValueError):
                expires = time.time() + 3000
            self._auth = (token, expires)
        return token

    def _client(self) -> Any:
        from github import Github
        from urllib3.util import Retry

        auth = self._credentials()
        # Retries: 5xx, for every method but POST (a POST that failed ambiguously may have happened, so
        # callers decide: see upsert_comment). Never a rate limit: PyGithub's own retry would sleep until
        # the reset, up to an hour, inside a shared loop; GitHubRateLimited parks the work instead.
        retry = Retry(total=3, backoff_factor=0.5, status_forcelist=[500, 502, 503, 504],
                      allowed_methods={"GET", "HEAD", "PATCH", "PUT", "DELETE"}, respect_retry_after_header=False,
                      raise_on_status=False)
        # lazy: no request until a call needs one; no sleeping between calls (the service paces itself)
        return Github(base_url=self.api_url, auth=auth, timeout=int(self.timeout), retry=retry, lazy=True,
                      seconds_between_requests=0, seconds_between_writes=0)

    def _call(self, what: str, fn: Any, attempts: int = 1) -> Any:
        """Run `fn(client)`; with attempts > 1 (idempotent calls only) retry 5xx and network errors."""
        from github import GithubException, RateLimitExceededException

        for attempt in range(1, attempts + 1):
            try:
                return fn(self._client())
            except RateLimitExceededException as exc:
                retry_at = _retry_at(exc.headers)
                raise GitHubRateLimited(f"GitHub API {what}: rate limited (HTTP {exc.status}) until "
                                        f"{time.strftime('%H:%M:%S', time.gmtime(retry_at))} UTC", retry_at) from None
            except GithubException as exc:
                message = exc.data.get("message") if isinstance(exc.data, dict) else None
                if exc.status == 429:   # PyGithub maps only 403s to RateLimitExceededException
                    raise GitHubRateLimited(f"GitHub API {what}: rate limited (HTTP 429)",
                                            _retry_at(exc.headers)) from None
                if attempt < attempts and exc.status >= 500:
                    time.sleep(0.5 * attempt)
                    continue
                raise GitHubUnavailable(f"GitHub API {what}: HTTP {exc.status} {message or ''}".strip(),
                                        status=exc.status) from None
            except Exception as exc:   # connection refused, DNS, timeout: the service must go on
                if attempt < attempts:
                    time.sleep(0.5 * attempt)
                    continue
                raise GitHubUnavailable(f"GitHub API {what}: {type(exc).__name__}: {redact(str(exc))}"
                                        ) from None
        raise AssertionError("unreachable")

    def pull_request_files(self, repository: str, number: int) -> list[str]:
        def fetch(gh: Any) -> list[str]:
            files: list[str] = []
            for f in gh.get_repo(repository, lazy=True).get_pull(number).get_files():
                files.append(f.filename)
                if f.previous_filename:   # a rename touches both paths
                    files.append(f.previous_filename)
            return files

        return self._call(f"list files of {repository}#{number}", fetch)

    def permission(self, repository: str, login: str) -> str:
        """`login`'s access to the repository: admin, maintain, write, triage, read or none."""
        def fetch(gh: Any) -> str:
            _, data = gh.requester.requestJsonAndCheck(
                "GET", f"/repos/{repository}/collaborators/{login}/permission")
            data = data if isinstance(data, dict) else {}
            return str(data.get("role_name") or data.get("permission") or "none")   # role_name knows maintain

        return self._call(f"read {login}'s access to {repository}", fetch, attempts=3)

    def pull_request(self, repository: str, number: int) -> dict[str, Any]:
        """The pull request as the REST API returns it (head, base, user)."""
        def fetch(gh: Any) -> dict[str, Any]:
            _, data = gh.requester.requestJsonAndCheck("GET", f"/repos/{repository}/pulls/{number}")
            return data if isinstance(data, dict) else {}

        return self._call(f"read {repository}#{number}", fetch, attempts=3)

    def compare_files(self, repository: str, base: str, head: str) -> list[str]:
        return self._call(f"compare {base[:7]}...{head[:7]}", lambda gh: [
            f.filename for f in gh.get_repo(repository, lazy=True).compare(base, head).files])

    def file_at(self, repository: str, path: str, ref: str) -> str | None:
        """A file's text at a commit, or None when it did not exist there."""
        import base64
        import binascii

        from github import UnknownObjectException

        def fetch(gh: Any) -> str | None:
            try:
                # Accept: application/json explicitly; the endpoint's first listed media type
                # (application/vnd.github.object) is one some servers and mocks cannot produce
                _, data = gh.requester.requestJsonAndCheck(
                    "GET", f"/repos/{repository}/contents/{path}", parameters={"ref": ref},
                    headers={"Accept": "application/json"})
            except UnknownObjectException:
                return None
            if not isinstance(data, dict) or data.get("type") != "file":
                return None
            try:
                return base64.b64decode(data.get("content") or "").decode("utf-8", errors="replace")
            except binascii.Error:
                raise ValueError(f"{path}@{ref[:7]}: the content is not valid base64") from None

        return self._call(f"read {path}@{ref[:7]}", fetch)

    def dispatch_workflow(self, repository: str, workflow: str, ref: str, inputs: dict[str, str]) -> None:
        def dispatch(gh: Any) -> None:
            if not gh.get_repo(repository, lazy=True).get_workflow(workflow).create_dispatch(ref, inputs):
                raise RuntimeError("GitHub refused the dispatch")

        self._call(f"dispatch {workflow}", dispatch)

    def set_status(self, repository: str, sha: str, state: str, description: str, context: str,
                   target_url: str | None = None) -> None:
        """A commit status; posting the same context again replaces it, so retrying is safe."""
        extra = {"target_url": target_url} if target_url else {}
        description = redact(description)
        self._call(f"set status {context} on {sha[:7]}", lambda gh: gh.get_repo(repository, lazy=True)
                   .get_commit(sha).create_status(state=state, description=description[:140], context=context,
                                                  **extra), attempts=3)

    def login(self) -> str:
        """Who this token acts as. An Actions GITHUB_TOKEN may not read /user; it writes as github-actions[bot].
        An app writes as `<its slug>[bot]`."""
        if self._login is None and self.app is not None:
            from github import Auth, Github

            app = self.app

            def slug(_gh: Any) -> str:   # GET /app takes the app's JWT, not an installation token
                signer = Github(base_url=self.api_url, auth=Auth.AppAuth(app.app_id, app.private_key),
                                timeout=int(self.timeout), lazy=True)
                _, data = signer.requester.requestJsonAndCheck("GET", "/app", headers=JSON_ACCEPT)
                return f"{(data or {}).get('slug') or 'mlgate'}[bot]"

            self._login = self._call("read the app", slug, attempts=3)
        if self._login is None:
            try:
                self._login = self._call("read the token's user", lambda gh: gh.get_user().login, attempts=3)
            except GitHubUnavailable as exc:
                if exc.status != 403 or os.environ.get("GITHUB_ACTIONS") != "true":
                    raise
                self._login = ACTIONS_BOT
        return self._login

    def upsert_comment(self, repository: str, number: int, marker: str, body: str) -> tuple[int, bool]:
        """Edit the issue/PR comment carrying `marker`, or create it: one comment, edited on every push.
        Returns (comment id, created). Only a comment this token wrote counts: anyone can post the marker."""
        author, body = self.login(), redact(body)

        def find(gh: Any) -> Any:
            for comment in gh.get_repo(repository, lazy=True).get_issue(number).get_comments():
                if is_own_comment(comment.body, comment.user.login if comment.user else None, marker, author):
                    return comment
            return None

        existing = self._call(f"list comments of #{number}", find, attempts=3)
        if existing is not None:
            self._call(f"edit comment {existing.id}", lambda gh: existing.edit(body), attempts=3)
            return existing.id, False
        try:
            created = self._call(f"comment on #{number}", lambda gh: gh.get_repo(repository, lazy=True)
                                 .get_issue(number).create_comment(body))
        except GitHubUnavailable as exc:
            if exc.status is not None and exc.status < 500:
                raise
            # the POST may have gone through: look again before trying once more, never two comments
            existing = self._call(f"list comments of #{number}", find, attempts=3)
            if existing is not None:
                self._call(f"edit comment {existing.id}", lambda gh: existing.edit(body), attempts=3)
                return existing.id, False
            created = self._call(f"comment on #{number}", lambda gh: gh.get_repo(repository, lazy=True)
                                 .get_issue(number).create_comment(body))
        return created.id, True

    def commit_comment(self, repository: str, sha: str, body: str) -> int:
        body = redact(body)
        return self._call(f"comment on commit {sha[:7]}", lambda gh: gh.get_repo(repository, lazy=True)
                          .get_commit(sha).create_comment(body)).id

    def issue_comment(self, repository: str, number: int, body: str) -> int:
        body = redact(body)
        return self._call(f"comment on #{number}", lambda gh: gh.get_repo(repository, lazy=True)
                          .get_issue(number).create_comment(body)).id

    def workflow_run(self, repository: str, workflow: str, job_id: str) -> WorkflowRun | None:
        """The newest run whose name carries `job_id` (run-name in retrain.yml), or None if not seen yet."""
        def find(gh: Any) -> WorkflowRun | None:
            runs = gh.get_repo(repository, lazy=True).get_workflow(workflow).get_runs(event="workflow_dispatch")
            for i, run in enumerate(runs):
                if job_id in (run.display_title or run.name or ""):
                    return WorkflowRun(run.id, run.status, run.conclusion)
                if i >= 50:
                    break
            return None

        return self._call(f"find the run of job {job_id}", find, attempts=3)

    def create_check_run(self, repository: str, sha: str, name: str, external_id: str, summary: str,
                         details_url: str | None = None) -> int:
        """A check run `in_progress` on `sha` (GitHub Apps only); returns its id."""
        body = {"name": name, "head_sha": sha, "status": "in_progress", "external_id": external_id,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "output": {"title": name, "summary": redact(summary)[:MAX_CHECK_TEXT]}}
        if details_url:
            body["details_url"] = details_url

        def create(gh: Any) -> int:
            _, data = gh.requester.requestJsonAndCheck("POST", f"/repos/{repository}/check-runs", input=body,
                                                       headers=JSON_ACCEPT)
            return int((data or {})["id"])

        return self._call(f"create check run {name} on {sha[:7]}", create)

    def update_check_run(self, repository: str, check_run_id: int, title: str, summary: str,
                         conclusion: str | None = None, text: str | None = None) -> None:
        """Progress (`in_progress`) or, with a conclusion, the verdict. Replaces the output: safe to retry."""
        output = {"title": redact(title)[:200], "summary": redact(summary)[:MAX_CHECK_TEXT]}
        if text:
            output["text"] = redact(text)[:MAX_CHECK_TEXT]
        body: dict[str, Any] = {"output": output}
        if conclusion is None:
            body["status"] = "in_progress"
        else:
            body |= {"status": "completed", "conclusion": conclusion,
                     "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._call(f"update check run {check_run_id}", lambda gh: gh.requester.requestJsonAndCheck(
            "PATCH", f"/repos/{repository}/check-runs/{check_run_id}", input=body, headers=JSON_ACCEPT), attempts=3)

    def commit_verdict(self, repository: str, sha: str, name: str, title: str, summary: str, passed: bool) -> None:
        """A finished verdict on a commit: a check run where this is an app, else a commit status."""
        if self.is_app:
            check_id = self.create_check_run(repository, sha, name, f"{name}:{sha}", summary)
            self.update_check_run(repository, check_id, title, summary, "success" if passed else "failure")
        else:
            self.set_status(repository, sha, "success" if passed else "failure", title, name)

    def find_pull_request(self, repository: str, head_branch: str, base: str) -> int | None:
        """The open pull request from `head_branch` (in this repository) into `base`, if there is one."""
        owner = repository.split("/")[0]

        def find(gh: Any) -> int | None:
            _, data = gh.requester.requestJsonAndCheck(
                "GET", f"/repos/{repository}/pulls",
                parameters={"state": "open", "head": f"{owner}:{head_branch}", "base": base}, headers=JSON_ACCEPT)
            for pull in data if isinstance(data, list) else []:
                if isinstance(pull, dict) and (pull.get("head") or {}).get("ref") == head_branch:
                    return int(pull["number"])
            return None

        return self._call(f"find the pull request from {head_branch}", find, attempts=3)

    def open_pull_request(self, repository: str, head_branch: str, base: str, title: str, body: str) -> int:
        """A new pull request from `head_branch` into `base`; its number."""
        payload = {"title": redact(title)[:250], "head": head_branch, "base": base,
                   "body": redact(body)[:MAX_PR_BODY], "maintainer_can_modify": True}

        def create(gh: Any) -> int:
            _, data = gh.requester.requestJsonAndCheck("POST", f"/repos/{repository}/pulls", input=payload,
                                                       headers=JSON_ACCEPT)
            return int((data or {})["number"])

        return self._call(f"open a pull request from {head_branch}", create)

    def update_pull_request(self, repository: str, number: int, title: str, body: str) -> None:
        payload = {"title": redact(title)[:250], "body": redact(body)[:MAX_PR_BODY]}
        self._call(f"update {repository}#{number}", lambda gh: gh.requester.requestJsonAndCheck(
            "PATCH", f"/repos/{repository}/pulls/{number}", input=payload, headers=JSON_ACCEPT), attempts=3)

    def cancel_workflow_run(self, repository: str, run_id: int) -> None:
        def cancel(gh: Any) -> None:
            gh.requester.requestJsonAndCheck("POST", f"/repos/{repository}/actions/runs/{run_id}/cancel")

        self._call(f"cancel run {run_id}", cancel)


@dataclass
class WorkflowRun:
    id: int
    status: str                # queued | in_progress | completed | …
    conclusion: str | None

    @property
    def completed(self) -> bool:
        return self.status == "completed"
