"""The GitHub REST API through PyGithub, as the service uses it: file lists, file contents,
workflow dispatch. Honors GITHUB_API_URL (GitHub Enterprise, or a contract-test server)
and GITHUB_TOKEN; the token never reaches a log line or an error message."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from automation.errors import MlgateError

DEFAULT_API_URL = "https://api.github.com"


class GitHubUnavailable(MlgateError):
    """The API could not answer (network, auth, rate limit, 5xx): callers fall back and say so."""


@dataclass
class GitHubSource:
    api_url: str
    token: str | None
    timeout: float = 10.0

    @classmethod
    def from_env(cls) -> "GitHubSource":
        return cls(api_url=os.environ.get("GITHUB_API_URL") or DEFAULT_API_URL,
                   token=os.environ.get("GITHUB_TOKEN") or None)

    def _client(self) -> Any:
        from github import Auth, Github

        auth = Auth.Token(self.token) if self.token else None
        # lazy: no request until a call needs one; no sleeping between calls (the service paces itself)
        return Github(base_url=self.api_url, auth=auth, timeout=int(self.timeout), retry=2, lazy=True,
                      seconds_between_requests=0, seconds_between_writes=0)

    def _call(self, what: str, fn: Any) -> Any:
        from github import GithubException

        try:
            return fn(self._client())
        except GithubException as exc:
            message = exc.data.get("message") if isinstance(exc.data, dict) else None
            raise GitHubUnavailable(f"GitHub API {what}: HTTP {exc.status} {message or ''}".strip()) from None
        except Exception as exc:   # connection refused, DNS, timeout: the service must go on
            raise GitHubUnavailable(f"GitHub API {what}: {type(exc).__name__}: {exc}") from None

    def pull_request_files(self, repository: str, number: int) -> list[str]:
        def fetch(gh: Any) -> list[str]:
            files: list[str] = []
            for f in gh.get_repo(repository, lazy=True).get_pull(number).get_files():
                files.append(f.filename)
                if f.previous_filename:   # a rename touches both paths
                    files.append(f.previous_filename)
            return files

        return self._call(f"list files of {repository}#{number}", fetch)

    def compare_files(self, repository: str, base: str, head: str) -> list[str]:
        return self._call(f"compare {base[:7]}...{head[:7]}", lambda gh: [
            f.filename for f in gh.get_repo(repository, lazy=True).compare(base, head).files])

    def file_at(self, repository: str, path: str, ref: str) -> str | None:
        from github import UnknownObjectException

        def fetch(gh: Any) -> str | None:
            try:
                return gh.get_repo(repository, lazy=True).get_contents(path, ref=ref).decoded_content.decode()
            except UnknownObjectException:
                return None   # the file did not exist at that commit

        return self._call(f"read {path}@{ref[:7]}", fetch)

    def dispatch_workflow(self, repository: str, workflow: str, ref: str, inputs: dict[str, str]) -> None:
        def dispatch(gh: Any) -> None:
            if not gh.get_repo(repository, lazy=True).get_workflow(workflow).create_dispatch(ref, inputs):
                raise RuntimeError("GitHub refused the dispatch")

        self._call(f"dispatch {workflow}", dispatch)

    def workflow_run_state(self, repository: str, workflow: str, job_id: str) -> tuple[str, str | None] | None:
        """(status, conclusion) of the run whose name carries `job_id`, or None if not seen yet."""
        def find(gh: Any) -> tuple[str, str | None] | None:
            runs = gh.get_repo(repository, lazy=True).get_workflow(workflow).get_runs(event="workflow_dispatch")
            for i, run in enumerate(runs):
                if job_id in (run.display_title or run.name or ""):
                    return run.status, run.conclusion
                if i >= 50:
                    break
            return None

        return self._call(f"find the run of job {job_id}", find)
