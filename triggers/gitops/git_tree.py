"""Git plumbing for deploy files: read them at a commit, write a one-file commit on top of a branch, push.

Everything goes through object ids (`ls-tree`, `cat-file`, `commit-tree`): no worktree is checked out, so
nothing from the repository is ever written to, or read from, the service's disk by path, and a link in the
tree stays a link object (refused), never followed.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from triggers.jobs.checkout import CheckoutFailed

LINK_MODE, FILE_MODES = "120000", ("100644", "100755")
LOCK_ATTEMPTS = 5


class GitFailed(CheckoutFailed):
    """A git command failed; the message is git's last line (no credential: remotes are redacted)."""


def git(repo: Path, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None,
        timeout: float = 120) -> bytes:
    done = subprocess.run(["git", "-C", str(repo), *args], input=stdin, capture_output=True, timeout=timeout,
                          env=None if env is None else os.environ | env)
    if done.returncode != 0:
        from automation.redaction import redact

        last = (done.stderr.decode("utf-8", "replace").strip().splitlines() or [f"git {args[0]} failed"])[-1]
        raise GitFailed(redact(last))
    return done.stdout


def has_remote(repo: Path) -> bool:
    return "origin" in git(repo, "remote").decode().split()


def _ref_raced(repo: Path, *args: str) -> bytes:
    """A git command that updates a ref another process on this clone may update at the same moment (the
    service's loop, serve-model, `mlgate reconcile`): git refuses the loser ("cannot lock ref"); it runs again."""
    for attempt in range(LOCK_ATTEMPTS):
        try:
            return git(repo, *args)
        except GitFailed as exc:
            if "cannot lock ref" not in str(exc) or attempt == LOCK_ATTEMPTS - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def branch_head(repo: Path, branch: str) -> str:
    """The branch's head at origin (fetched now), or the local branch where there is no remote."""
    if has_remote(repo):
        _ref_raced(repo, "fetch", "--quiet", "--no-write-fetch-head", "origin",
                   f"+refs/heads/{branch}:refs/remotes/origin/{branch}")
        return git(repo, "rev-parse", f"refs/remotes/origin/{branch}^{{commit}}").decode().strip()
    return git(repo, "rev-parse", f"refs/heads/{branch}^{{commit}}").decode().strip()


@dataclass(frozen=True)
class TreeEntry:
    path: str
    mode: str
    blob: str

    @property
    def is_file(self) -> bool:
        return self.mode in FILE_MODES


def entries_under(repo: Path, commit: str, folder: str) -> list[TreeEntry]:
    """Every entry below `folder` at `commit` (files, links, submodules), recursively."""
    out = git(repo, "ls-tree", "-r", "-z", "--full-tree", commit, "--", f"{folder.strip('/')}/")
    entries = []
    for record in out.split(b"\0"):
        if not record:
            continue
        meta, _, raw_path = record.partition(b"\t")
        mode, _kind, blob = meta.decode().split()
        entries.append(TreeEntry(raw_path.decode("utf-8", "replace"), mode, blob))
    return entries


def read_blob(repo: Path, blob: str, limit: int) -> bytes | None:
    """The blob's bytes, or None when it is larger than `limit` (never read then)."""
    if int(git(repo, "cat-file", "-s", blob).decode().strip()) > limit:
        return None
    return git(repo, "cat-file", "blob", blob)


def file_at(repo: Path, commit: str, path: str, limit: int) -> bytes | None:
    """A regular file's bytes at `commit`, None when absent (or not a regular file, or too large)."""
    out = git(repo, "ls-tree", "-z", "--full-tree", commit, "--", path).split(b"\0")[0]
    if not out:
        return None
    meta, _, _ = out.partition(b"\t")
    mode, kind, blob = meta.decode().split()
    if kind != "blob" or mode not in FILE_MODES:
        return None
    return read_blob(repo, blob, limit)


def commit_file(repo: Path, parent: str, path: str, content: str, message: str, author: tuple[str, str]) -> str:
    """A new commit on top of `parent` whose tree is `parent`'s with `path` set to `content`; its SHA. Nothing
    is checked out: a private index file holds the tree while it is built."""
    blob = git(repo, "hash-object", "-w", "--stdin", stdin=content.encode("utf-8")).decode().strip()
    name, email = author
    with tempfile.TemporaryDirectory(prefix="mlgate-index-") as scratch:
        env = {"GIT_INDEX_FILE": str(Path(scratch) / "index"), "GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email,
               "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email}
        git(repo, "read-tree", parent, env=env)
        git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
        tree = git(repo, "write-tree", env=env).decode().strip()
        return git(repo, "commit-tree", tree, "-p", parent, "-m", message, env=env).decode().strip()


def push(repo: Path, commit: str, branch: str, force: bool = False) -> None:
    """`commit` becomes `branch` at origin (a fast-forward unless `force`); GitFailed when refused."""
    git(repo, "push", "--quiet", "origin", f"{'+' if force else ''}{commit}:refs/heads/{branch}")
    _ref_raced(repo, "update-ref", f"refs/remotes/origin/{branch}", commit)
