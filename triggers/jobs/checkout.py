"""Materialize the commit a job names: a detached git worktree at that exact SHA, removed afterwards.

The local executor runs `mlgate run` inside it, so a push retrains the code and `mlgate.yaml` of the
commit that was pushed, and a PR report describes the PR's head, not whatever the service has on disk.
A job with no commit (manual, drift) runs the configured branch's head, and records which SHA that was.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SHA = re.compile(r"[0-9a-f]{7,64}")


class CheckoutFailed(Exception):
    """The commit cannot be materialized; the message is the job's one-line error."""


def _git(repo: Path, *args: str, timeout: float = 120) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise CheckoutFailed((done.stderr.strip().splitlines() or [f"git {args[0]} failed"])[-1])
    return done.stdout.strip()


def repository_root(path: Path) -> Path:
    try:
        return Path(_git(path, "rev-parse", "--show-toplevel"))
    except (CheckoutFailed, OSError) as exc:
        raise CheckoutFailed(f"{path} is not inside a git repository ({exc}): jobs run commits from one") from None


def _has_commit(repo: Path, sha: str) -> bool:
    try:
        _git(repo, "cat-file", "-e", f"{sha}^{{commit}}")
        return True
    except CheckoutFailed:
        return False


def _has_remote(repo: Path) -> bool:
    return "origin" in _git(repo, "remote").split()


def resolve_commit(repo: Path, sha: str | None, branch: str) -> str:
    """The full SHA to run: `sha` (fetched from origin when missing here), or the branch's head."""
    if sha is None:
        if _has_remote(repo):
            try:
                _git(repo, "fetch", "--quiet", "origin", branch)
                return _git(repo, "rev-parse", "FETCH_HEAD^{commit}")
            except CheckoutFailed:
                pass   # offline, or no such branch there: the local branch is the next best
        try:
            return _git(repo, "rev-parse", f"{branch}^{{commit}}")
        except CheckoutFailed:
            raise CheckoutFailed(f"branch '{branch}' (service.branch) is not in {repo}") from None
    if not SHA.fullmatch(sha):
        raise CheckoutFailed(f"'{sha[:80]}' is not a commit SHA")
    if not _has_commit(repo, sha) and _has_remote(repo):
        try:
            _git(repo, "fetch", "--quiet", "origin", sha)
        except CheckoutFailed as exc:
            raise CheckoutFailed(f"commit {sha[:12]} cannot be fetched from origin: {exc}") from None
    if not _has_commit(repo, sha):
        raise CheckoutFailed(f"commit {sha[:12]} is not in {repo} and cannot be fetched")
    return _git(repo, "rev-parse", f"{sha}^{{commit}}")


@contextmanager
def worktree(repo: Path, sha: str, dest: Path) -> Iterator[Path]:
    """A detached worktree of `repo` at `sha` in `dest`, removed (with its admin files) on the way out."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():   # left by a worker that died: a retry starts clean
        shutil.rmtree(dest)
        _git(repo, "worktree", "prune")
    _git(repo, "worktree", "add", "--quiet", "--detach", str(dest), sha)
    try:
        yield dest
    finally:
        try:
            _git(repo, "worktree", "remove", "--force", str(dest))
        except CheckoutFailed:
            shutil.rmtree(dest, ignore_errors=True)
            _git(repo, "worktree", "prune")
