"""The one thing that crosses from an untrusted build to the trusted side: its candidate folder's files.

Only the allow-listed names (automation/candidate.py), each a regular file with one link, under its size
cap, opened without following a link at any step (the folder, then each file, relative to the folder's
descriptor) and copied into a folder the service made. Nothing else the build wrote is read: not its exit
code, not its output, not a report or summary it may have left.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from automation.candidate import (MANIFEST_FILE, MAX_MANIFEST_BYTES, MAX_ONNX_BYTES, MAX_TOKENIZER_BYTES, ONNX_FILE,
                                  TOKENIZER_FILE)

ALLOWED = {MANIFEST_FILE: MAX_MANIFEST_BYTES, ONNX_FILE: MAX_ONNX_BYTES, TOKENIZER_FILE: MAX_TOKENIZER_BYTES}
REQUIRED = (MANIFEST_FILE, ONNX_FILE)
_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


class NoCandidate(Exception):
    """The build left no candidate that may cross (the message says why, in one line)."""


def _open_folder(parent: Path, name: str) -> int:
    try:   # the service made `parent`: the build, inside it, cannot swap it
        parent_fd = os.open(parent, _NOFOLLOW | os.O_DIRECTORY)
    except FileNotFoundError:
        raise NoCandidate("the build produced no candidate folder") from None
    try:
        return os.open(name, _NOFOLLOW | os.O_DIRECTORY, dir_fd=parent_fd)
    except FileNotFoundError:
        raise NoCandidate("the build produced no candidate folder") from None
    except OSError as exc:   # ELOOP/ENOTDIR: a link or a file where the folder should be
        raise NoCandidate(f"the candidate folder is not a plain folder ({os.strerror(exc.errno or 0)})") from None
    finally:
        os.close(parent_fd)


def open_beneath(root: Path, folders: tuple[str, ...]) -> int:
    """A descriptor of `root/folders…`, no link followed at any step below `root` (which the service made)."""
    fd = os.open(root, _NOFOLLOW | os.O_DIRECTORY)
    try:
        for folder in folders:
            inner = os.open(folder, _NOFOLLOW | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
    except OSError:
        os.close(fd)
        raise
    return fd


def copy_regular(folder_fd: int, name: str, limit: int, target: Path) -> bool:
    """Copy `name` (in `folder_fd`) to `target` if it is there; False when absent. Raises NoCandidate on
    anything odd: a link, a special file, a second link, over `limit`."""
    try:
        fd = os.open(name, _NOFOLLOW, dir_fd=folder_fd)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise NoCandidate(f"candidate {name} is not a regular file ({os.strerror(exc.errno or 0)})") from None
    with os.fdopen(fd, "rb") as source:
        info = os.fstat(source.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise NoCandidate(f"candidate {name} is not a regular file")
        if info.st_nlink != 1:   # a hard link: the same file is also somewhere the build must not hand over
            raise NoCandidate(f"candidate {name} has {info.st_nlink} links; a candidate file has one")
        if info.st_size > limit:
            raise NoCandidate(f"candidate {name} is {info.st_size:,} bytes, over {limit:,}")
        with open(target, "wb") as sink:
            copied = 0
            while chunk := source.read(min(1 << 20, limit + 1 - copied)):
                copied += len(chunk)
                if copied > limit:   # grew while being read
                    raise NoCandidate(f"candidate {name} is over {limit:,} bytes")
                sink.write(chunk)
    return True


def take_candidate(build_dir: Path, folder: str, dest: Path) -> Path:
    """The build's `build_dir/folder`, copied into the new folder `dest` (the trusted side's). Raises
    NoCandidate, with the reason, when there is nothing that may cross."""
    dest.mkdir(parents=True, exist_ok=False)
    folder_fd = _open_folder(build_dir, folder)
    try:
        present = {name for name, limit in ALLOWED.items() if copy_regular(folder_fd, name, limit, dest / name)}
    finally:
        os.close(folder_fd)
    missing = [name for name in REQUIRED if name not in present]
    if missing:
        raise NoCandidate(f"the build produced no candidate: {', '.join(missing)} missing")
    return dest
