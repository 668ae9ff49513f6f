"""GitHub's REST API as its official OpenAPI description allows it: Prism (npm `@stoplight/prism-cli`) serving
`@octokit/openapi`'s description, which answers 422 to any request the spec does not allow.

The spec's example responses carry https://api.github.com URLs, which PyGithub refuses to follow from another
host: the copy served has that base URL replaced by Prism's own address. The example `Link` header points at a
placeholder page (`/resource?page=2`) that no route serves, so the copy's `Link` example names only a first page:
every list is one page. Paths, request schemas and validation are the spec's, unchanged."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from triggers.local_broker import free_port

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "node_modules" / "@octokit" / "openapi" / "generated" / "api.github.com.json"
PRISM = ROOT / "node_modules" / ".bin" / "prism"


@contextlib.contextmanager
def prism_server(directory: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, Prism's log) while Prism runs, its spec copy and log in `directory`."""
    if not PRISM.exists() or not SPEC.exists():
        pytest.fail("Prism or the GitHub OpenAPI description is missing: run `make test` (it runs `npm ci`)")
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spec = directory / "api.github.com.json"
    description = json.loads(SPEC.read_text(encoding="utf-8").replace("https://api.github.com", url))
    description["components"]["headers"]["link"]["example"] = f'<{url}/resource?page=1>; rel="first"'
    spec.write_text(json.dumps(description), encoding="utf-8")
    log_path = spec.with_suffix(".log")
    log = open(log_path, "wb")
    process = subprocess.Popen([str(PRISM), "mock", str(spec), "--port", str(port), "--host", "127.0.0.1"],
                               stdout=log, stderr=subprocess.STDOUT)

    def up() -> bool:
        try:
            httpx.get(url + "/", timeout=1)
            return True
        except httpx.HTTPError:
            return False

    try:
        assert wait_for(up, 180, interval=0.5), log_path.read_text()[-2000:]
        yield url, log_path
    finally:
        process.terminate()
        process.wait(20)
        log.close()
