"""The data fingerprint: which data a version was trained and tested on.

Data read from files (`Splits.sources`) is fingerprinted by a manifest of those files (path, size, content
hash) plus what was taken from them (the rows and labels of each split), not by hashing every array: hashing
60,000 images on every job costs more than reading the manifest, and the manifest says *which files* changed.
A file's content hash is cached by (size, mtime), so an unchanged corpus is not read again.

The code fingerprint (the model file's content) is the other half of what a checkpoint records about what
wrote it (automation/checkpoint.Lineage).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from automation.data import DiskArray, Splits

CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def manifest(paths: list[str], cache_file: Path | None = None) -> list[dict[str, Any]]:
    """One entry per file: its path, size and SHA-256; hashes come from `cache_file` while size and mtime
    are unchanged."""
    cache: dict[str, Any] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cache = {}   # a damaged cache costs one re-read, never a wrong hash
    entries, changed = [], False
    for name in paths:
        path = Path(name)
        stat = path.stat()
        key = f"{stat.st_size}:{stat.st_mtime_ns}"
        cached = cache.get(str(path))
        if cached is None or cached.get("key") != key:
            cached = cache[str(path)] = {"key": key, "sha256": file_digest(path)}
            changed = True
        entries.append({"path": str(path), "size": stat.st_size, "sha256": cached["sha256"]})
    if changed and cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(partial, cache_file)
    return entries


def _update_with(digest: Any, x: Any) -> None:
    if isinstance(x, DiskArray):   # the rows taken from the file; the file itself is in the manifest
        digest.update(f"disk:{x.path.name}:{x.shape}".encode())
        rows = np.arange(len(x)) if x.rows is None else x.rows
        digest.update(np.ascontiguousarray(rows).tobytes())
        tail = getattr(x, "tail", None)
        if tail is not None:
            digest.update(np.ascontiguousarray(tail).tobytes())
        return
    array = np.asarray(x)
    digest.update(str(array.shape).encode())
    if array.dtype == object:   # text: the strings themselves
        for item in array.tolist():
            digest.update(str(item).encode("utf-8", "surrogatepass") + b"\0")
        return
    digest.update(np.ascontiguousarray(array).tobytes())


def data_fingerprint(splits: Splits, cache_file: Path | None = None) -> tuple[str, list[dict[str, Any]]]:
    """16 hex digits over the source files' manifest and every split's examples (or, on disk, its rows) and
    labels; and the manifest itself (empty for data made in memory)."""
    entries = manifest(list(splits.sources), cache_file) if splits.sources else []
    digest = hashlib.sha256(json.dumps([(e["path"], e["size"], e["sha256"]) for e in entries]).encode())
    for x, y in ((splits.x_train, splits.y_train), (splits.x_val, splits.y_val), (splits.x_test, splits.y_test)):
        _update_with(digest, x)
        digest.update(np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()[:16], entries


def code_fingerprint(build: Any) -> str:
    """16 hex digits over the user's source files that define `build` (through functools.partial, whose
    function arguments count too: the job's builder, in mlgate's own package, wraps the model file's build()).
    mlgate's files are left out, so the job and a direct train_model() call agree; a model that imports its
    layers from elsewhere is covered by the commit, where the job knows it."""
    own = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(p for p in _source_files(build) if not Path(p).resolve().is_relative_to(own)):
        digest.update(f"{Path(path).name}\0".encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def _source_files(obj: Any) -> set[str]:
    import functools
    import inspect

    if isinstance(obj, functools.partial):
        return _source_files(obj.func).union(*(_source_files(a) for a in (*obj.args, *obj.keywords.values())))
    if inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isclass(obj):
        try:
            source = inspect.getsourcefile(obj)
        except TypeError:   # built in: nothing of the user's to hash
            return set()
        return {source} if source else set()
    return set()
