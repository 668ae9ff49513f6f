"""The one channel from an outsider's build to the trusted side, attacked: only the candidate's files cross
(regular, one link, capped, no link followed), a build's output is bounded in memory and on disk, and a
sandboxed process meets its limits with the limit named."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from automation.config import SandboxLimits, parse_config
from automation.store import open_store
from automation.summary import JobSummary
from tests.conftest import fast_config, wait_for
from triggers.jobs.boundary import NoCandidate, take_candidate
from triggers.jobs.executors import Finished, LocalExecutor
from triggers.jobs.job_end import copy_report, outcome_from_summary
from triggers.jobs.sandbox import Limits, sandboxed

PASSING = ('{"job_id": "x", "model": "digits_mlp", "gate": {"passed": true, "checks": []}, "promoted": true, '
           '"cost": {"wall_seconds": 1e11, "cpu_seconds": 99999}}')


def a_candidate(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "candidate.json").write_text('{"input_shape": [64], "dtype": "float32", "classes": []}')
    (folder / "model.onnx").write_bytes(b"onnx bytes")
    return folder


# --- what crosses ------------------------------------------------------------------------------------------------

def test_a_plain_candidate_crosses_and_only_its_allowed_files(tmp_path: Path) -> None:
    build = tmp_path / "build"
    a_candidate(build / "candidate")
    (build / "candidate" / "summary.json").write_text(PASSING)   # a claim of its own: never read
    taken = take_candidate(build, "candidate", tmp_path / "taken")
    assert sorted(p.name for p in taken.iterdir()) == ["candidate.json", "model.onnx"]
    assert (taken / "model.onnx").read_bytes() == b"onnx bytes"


@pytest.mark.parametrize("attack", ["file_symlink", "folder_symlink", "hard_link", "fifo", "folder_is_file",
                                    "oversize", "missing_model", "no_folder"])
def test_no_link_special_file_or_oversize_file_crosses(tmp_path: Path, attack: str) -> None:
    build = tmp_path / "build"
    folder = a_candidate(build / "candidate")
    secret = tmp_path / "service-secrets.env"
    secret.write_text("GITHUB_TOKEN=ghp_secret")
    if attack == "file_symlink":
        (folder / "model.onnx").unlink()
        (folder / "model.onnx").symlink_to("/proc/self/environ")
    elif attack == "folder_symlink":
        os.rename(folder, build / "real")
        (build / "candidate").symlink_to(tmp_path)
    elif attack == "hard_link":
        (folder / "model.onnx").unlink()
        os.link(secret, folder / "model.onnx")
    elif attack == "fifo":
        (folder / "model.onnx").unlink()
        os.mkfifo(folder / "model.onnx")   # opened non-blocking: a writer that never comes cannot hang the service
    elif attack == "folder_is_file":
        (build / "candidate" / "model.onnx").unlink()
        (build / "candidate" / "candidate.json").unlink()
        folder.rmdir()
        (build / "candidate").write_text("not a folder")
    elif attack == "oversize":
        (folder / "candidate.json").write_bytes(b" " * (64 * 1024 + 1))
    elif attack == "missing_model":
        (folder / "model.onnx").unlink()
    elif attack == "no_folder":
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()
    with pytest.raises(NoCandidate) as refused:
        take_candidate(build, "candidate", tmp_path / "taken")
    assert "\n" not in str(refused.value) and "ghp_secret" not in str(refused.value)
    copied = [p.read_bytes() for p in (tmp_path / "taken").iterdir()] if (tmp_path / "taken").exists() else []
    assert not any(b"ghp_secret" in data or b"PATH=" in data for data in copied)


def test_a_report_left_as_a_link_to_the_environment_is_not_copied(tmp_path: Path) -> None:
    written = tmp_path / "sandbox" / "reports" / "job" / "report.html"
    written.parent.mkdir(parents=True)
    written.symlink_to("/proc/self/environ")
    assert not copy_report(tmp_path / "sandbox", written, tmp_path / "service" / "report.html")
    assert not (tmp_path / "service" / "report.html").exists()
    written.unlink()
    secret = tmp_path / "service-secrets.env"
    secret.write_text("GITHUB_TOKEN=ghp_secret")
    os.link(secret, written)   # a hard link: the same secret under the report's name
    assert not copy_report(tmp_path / "sandbox", written, tmp_path / "service" / "report.html")
    written.unlink()
    written.write_text("<html>ok</html>")
    assert copy_report(tmp_path / "sandbox", written, tmp_path / "service" / "report.html")
    assert (tmp_path / "service" / "report.html").read_text() == "<html>ok</html>"
    # a folder on the way that is a link (to another job's reports, say) is not followed either
    elsewhere = tmp_path / "another-job"
    elsewhere.mkdir()
    (elsewhere / "report.html").write_text("another tenant's report")
    (tmp_path / "sandbox" / "reports" / "job").rename(tmp_path / "sandbox" / "reports" / "old")
    (tmp_path / "sandbox" / "reports" / "job").symlink_to(elsewhere)
    assert not copy_report(tmp_path / "sandbox", written, tmp_path / "service" / "copied.html")
    assert not (tmp_path / "service" / "copied.html").exists()


def test_an_exit_code_is_a_preemption_only_when_the_service_stopped_the_job() -> None:
    assert outcome_from_summary(75, None, None, stopped=True).state == "preempted"
    unasked = outcome_from_summary(75, None, None, stopped=False)
    assert unasked.state == "failed" and "nothing stopped" in unasked.fields["error"]


def test_a_forged_cost_or_verdict_of_the_wrong_type_is_no_summary() -> None:
    assert JobSummary.parse({"gate": {"passed": "yes please", "checks": []}}) is None
    assert JobSummary.parse({"cost": {"wall_seconds": float("inf")}}) is None
    assert JobSummary.parse({"cost": {"cpu_seconds": -5}}) is None
    assert JobSummary.parse(["not", "a", "mapping"]) is None
    parsed = JobSummary.parse({"gate": {"passed": False, "checks": []}, "cost": {"cpu_seconds": 2.5}})
    assert parsed is not None and parsed.verdict is False and parsed.cost.totals() == {"cpu_seconds": 2.5}


# --- a process's output and limits, through the executor's own launch ----------------------------------------------

@pytest.fixture
def executor(tmp_path: Path) -> LocalExecutor:
    config = fast_config(epochs=1)
    config["workdir"] = str(tmp_path / "state")
    parsed = parse_config(__import__("yaml").safe_dump(config), str(tmp_path / "mlgate.yaml"), tmp_path)
    return LocalExecutor(parsed, None, open_store(f"sqlite:///{tmp_path / 'jobs.db'}"))


def launch(executor: LocalExecutor, tmp_path: Path, script: str, limits: Limits | None = None,
           sandbox: bool = False) -> Finished:
    job = SimpleNamespace(id="attack", model="digits_mlp", attempts=1)
    workdir = tmp_path / "sandbox-work"
    workdir.mkdir(exist_ok=True)
    command = [sys.executable, "-c", script]
    if sandbox:
        command = sandboxed(command, cwd=tmp_path, writable=workdir, env={"PATH": "/usr/bin:/bin"},
                            tmp_mb=limits.tmp_mb if limits else 1024)
    finished = executor._launch(command, tmp_path, {"PATH": "/usr/bin:/bin"}, job, None,  # type: ignore[arg-type]
                                tmp_path / "job.log", threading.Event(), workdir, limits)
    assert finished is not None
    return finished


def _rss_peak_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


def test_a_gigabyte_of_output_keeps_the_service_within_100_mb_and_the_log_bounded(executor: LocalExecutor,
                                                                                 tmp_path: Path) -> None:
    before = _rss_peak_kib()
    script = ("import sys\nline = b'x' * 1023 + b'\\n'\nblock = line * 1024\n"
              "for _ in range(1024): sys.stdout.buffer.write(block)\n"
              f"sys.stdout.buffer.write({PASSING!r}.encode())")
    finished = launch(executor, tmp_path, script)
    assert finished.exit_code == 0
    assert (_rss_peak_kib() - before) / 1024 < 100
    log = (tmp_path / "job.log").read_bytes()
    assert len(log) < 3 * 1024 * 1024 and b"bytes of stdout dropped" in log
    assert finished.last_line and finished.last_line.startswith('{"job_id"')   # the tail is kept


def test_a_short_output_is_logged_whole_and_its_last_line_kept(executor: LocalExecutor, tmp_path: Path) -> None:
    finished = launch(executor, tmp_path, "import sys; print('hello'); print('Error: bad thing', file=sys.stderr); "
                                          "print('{\"a\": 1}'); sys.exit(1)")
    assert finished.exit_code == 1 and finished.last_line == '{"a": 1}' and finished.error == "Error: bad thing"
    assert (tmp_path / "job.log").read_text().count("hello") == 1


def test_an_exit_75_nobody_asked_for_fails_the_job(executor: LocalExecutor, tmp_path: Path) -> None:
    finished = launch(executor, tmp_path, "raise SystemExit(75)")
    outcome = executor._trusted_end(finished, SimpleNamespace(id="attack"), tmp_path / "sandbox-work")  # type: ignore[arg-type]
    assert not finished.stopped and outcome.state == "failed"


def limits(**overrides: Any) -> Limits:
    base = dict(address_space=8 * 1024 ** 3, cpu_seconds=3600, file_size=64 * 1024 ** 2, processes=64,
                open_files=256, tmp_mb=16, workdir_bytes=128 * 1024 ** 2)
    return Limits(**(base | overrides))   # type: ignore[arg-type]


@pytest.mark.parametrize("attack, script, named", [
    ("fork 10,000 processes", "import os, time\nfor _ in range(10000):\n    if os.fork() == 0:\n"
                              "        time.sleep(30); os._exit(0)\n", "processes"),
    ("spin the CPU", "while True: pass", "CPU time"),
    ("write a huge file", "open('big', 'wb').write(b'x' * (80 * 1024 ** 2))", "file_size_mb"),
    ("fill /tmp", "open('/tmp/fill', 'wb').write(b'x' * (32 * 1024 ** 2))", "tmp_mb"),
    ("allocate without end", "chunks = []\nwhile True: chunks.append(bytearray(256 * 1024 ** 2))", "memory"),
    ("fill its folder", "import os\nfor i in range(6):\n    open(f'f{i}', 'wb').write(os.urandom(60 * 1024 ** 2))\n"
                        "import time; time.sleep(30)", "workdir_mb"),
])
def test_a_sandboxed_process_meets_its_limit_and_the_limit_is_named(executor: LocalExecutor, tmp_path: Path,
                                                                    attack: str, script: str, named: str) -> None:
    # the CPU and memory limits low enough to be met in a moment (8 GiB of memory took 13-25 s to fill)
    chosen = limits(**{"spin the CPU": {"cpu_seconds": 2},
                       "allocate without end": {"address_space": 1024 ** 3}}.get(attack, {}))
    os.chdir(tmp_path)
    workdir = tmp_path / "sandbox-work"
    workdir.mkdir()
    script = f"import os; os.chdir({str(workdir)!r})\n" + script
    finished = launch(executor, tmp_path, script, chosen, sandbox=True)
    assert finished.error and finished.error.startswith("stopped:") and named in finished.error, (
        attack, finished, (tmp_path / "job.log").read_text()[-2000:])


def test_a_builds_exit_code_and_output_never_reach_the_verdict(executor: LocalExecutor, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Every exit code 0-255 with a passing summary printed: the outcome is the judge's, always the same; with
    no candidate left, 'the build produced no candidate', never a verdict."""
    judge_summary = ('{"job_id": "attack", "model": "digits_mlp", "gate": {"passed": false, "checks": '
                     '[{"name": "min accuracy", "status": "failed"}]}, "cost": {"wall_seconds": 3.0, "cpu_seconds": 2.0}}')
    judged: list[Path] = []

    def fake_judge(self: LocalExecutor, candidate: Path, *args: Any) -> Finished:
        judged.append(candidate)
        return Finished(3, False, judge_summary, None, {"wall_seconds": 3.0})

    monkeypatch.setattr(LocalExecutor, "_judge", fake_judge)
    job = SimpleNamespace(id="attack", model="digits_mlp", attempts=1, sha=None, pr=7, trigger="pr", payload="{}")
    for leaves_candidate in (True, False):
        outcomes = set()
        for code in range(256):
            workdir = tmp_path / f"{leaves_candidate}-{code}"

            def fake_build(self: LocalExecutor, tree: Path, config: Path, args: list[str], read_only: list[Path],
                           build_dir: Path, *rest: Any, progress: bool = True) -> Finished:
                assert progress is False   # nothing but the candidate is read from an outsider's build
                if leaves_candidate:
                    a_candidate(build_dir / "candidate")
                return Finished(code, False, PASSING, "Error: forged", {"wall_seconds": 1.0, "cpu_seconds": 0.5})

            monkeypatch.setattr(LocalExecutor, "_sandboxed", fake_build)
            outcome = executor._build_and_judge(tmp_path, tmp_path / "mlgate.yaml", [], workdir, job,  # type: ignore[arg-type]
                                                None, tmp_path / "job.log", threading.Event())
            outcomes.add((outcome.state, outcome.fields.get("error")))
        if leaves_candidate:
            assert outcomes == {("gate_failed", None)}   # the judge's verdict, whatever the build said
        else:
            [(state, error)] = outcomes
            assert state == "failed" and error.startswith("failed: the build produced no candidate")
            assert "forged" not in error   # the build's own `Error:` line does not cross either
    assert len(judged) == 256
    stats = __import__("triggers.jobs.queue", fromlist=["job_stats"]).job_stats(executor.engine)
    assert stats["cost:cpu_seconds"] == 256 * (2.0 + 0.5)   # the judge's and the measured build's, never 99999


def test_a_stopped_sandboxed_job_gets_the_sigterm_and_checkpoints(executor: LocalExecutor, tmp_path: Path) -> None:
    """A cancel or preemption reaches the job inside bubblewrap, not bwrap (which forwards nothing and dies of
    it, taking the job with it mid-checkpoint): the job's own handler runs and its exit 75 comes back."""
    workdir = tmp_path / "sandbox-work"
    workdir.mkdir()
    script = ("import signal, sys, time\n"
              f"def checkpoint(*_):\n    open({str(workdir / 'checkpoint')!r}, 'w').write('saved')\n    sys.exit(75)\n"
              "signal.signal(signal.SIGTERM, checkpoint)\n"
              f"open({str(workdir / 'ready')!r}, 'w').close()\n"
              "time.sleep(120)\n")
    command = sandboxed([sys.executable, "-c", script], cwd=tmp_path, writable=workdir, env={"PATH": "/usr/bin:/bin"})
    lost = threading.Event()
    threading.Thread(target=lambda: wait_for(lambda: (workdir / "ready").exists(), 60) and lost.set(),
                     daemon=True).start()
    job = SimpleNamespace(id="stopped", model="digits_mlp", attempts=1)
    finished = executor._launch(command, tmp_path, {"PATH": "/usr/bin:/bin"}, job, None,  # type: ignore[arg-type]
                                tmp_path / "job.log", lost, workdir, Limits.resolve(SandboxLimits(), 10))
    assert finished is not None and finished.stopped and finished.exit_code == 75
    assert (workdir / "checkpoint").read_text() == "saved"
