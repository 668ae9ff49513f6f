"""A job's process as the trusted side sees it: started with its output bounded (job_log.py), reaped with
`wait4`, so its CPU time and peak memory come from the kernel and never from anything it prints."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from triggers.jobs.job_log import JobLog


class Child:
    def __init__(self, command: list[str], *, cwd: Path, env: dict[str, str], log: JobLog,
                 preexec: Callable[[], None] | None = None) -> None:
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env,
                                        preexec_fn=preexec)
        self.stdout = log.follow("stdout", self.process.stdout)   # type: ignore[arg-type]
        self.stderr = log.follow("stderr", self.process.stderr)   # type: ignore[arg-type]
        self.exit_code: int | None = None
        self.rusage: Any = None
        self.wall_seconds = 0.0

    def poll(self) -> int | None:
        if self.exit_code is None:
            pid, status, rusage = os.wait4(self.process.pid, os.WNOHANG)
            if pid:
                self.exit_code = self.process.returncode = os.waitstatus_to_exitcode(status)
                self.rusage, self.wall_seconds = rusage, time.monotonic() - self.started
        return self.exit_code

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None when it is still running after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
        return self.exit_code

    def signal(self, kill: bool = False) -> None:
        # os.kill, not Popen's: Popen.send_signal polls first and would reap it, losing wait4's figures; a pid
        # this object has not reaped is still its child (alive or a zombie), so it cannot be another process
        if self.exit_code is None:
            os.kill(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)

    def terminate_sandboxed(self) -> None:
        """SIGTERM to the job inside a bubblewrap sandbox, not to bwrap: bwrap forwards no signal and dies of
        it, and its --die-with-parent then kills the job mid-checkpoint. bwrap exits with the job's code."""
        import psutil

        if self.exit_code is not None:
            return
        try:
            inside = [p for p in psutil.Process(self.process.pid).children(recursive=True)
                      if p.name() != "bwrap" and p.parent() is not None and p.parent().name() == "bwrap"]
        except psutil.Error:
            inside = []
        for process in inside:
            try:
                process.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        if not inside:   # not (or no longer) a sandbox with a job in it
            self.signal()

    def cost(self) -> dict[str, float]:
        """What the process and the children it waited for spent, as the kernel counted it."""
        if self.rusage is None:
            return {"wall_seconds": round(time.monotonic() - self.started, 3)}
        return {"wall_seconds": round(self.wall_seconds, 3),
                "cpu_seconds": round(self.rusage.ru_utime + self.rusage.ru_stime, 3),
                "peak_rss_mb": round(self.rusage.ru_maxrss / 1024, 1)}   # Linux: KiB
