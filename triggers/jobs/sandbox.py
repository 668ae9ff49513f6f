"""What a local job's process may see: an environment built from an allow-list, and for PR jobs a
bubblewrap sandbox (Debian's `bubblewrap`).

Every job's environment is built up from names, never filtered down: a secret someone adds next is not
passed on because nobody listed it. A PR job runs as `nobody` in its own user, PID, IPC and network
namespaces. It sees the interpreter, its own tree (read-only), the data it is given (read-only), one
writable folder, and nothing of the service: not its /proc, not its state, not a network.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from automation.config import SandboxLimits
from automation.errors import MlgateError

# what any job needs from the service's environment: locale, threads, devices, and mlgate's own knobs
BASE_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_NUM_THREADS",
            "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "MLGATE_LOG_LEVEL", "MLGATE_DEBUG",
            "MLGATE_DATA_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# what a retrain of the default branch needs besides: the registry, the job database and the artifact store
REGISTRY_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD", "MLFLOW_S3_ENDPOINT_URL", "MLGATE_DATABASE_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
                "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCESS_KEY",
                "HOME")
NOBODY = "65534"


class SandboxUnavailable(MlgateError):
    """bubblewrap is missing or cannot create namespaces here: a PR job does not run unsandboxed."""


def job_environment(trusted: bool, extra_names: Iterable[str] = (), set_to: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a job starts with: the allow-listed names the service has, plus `set_to`. A trusted
    job (the default branch's retrain) also gets the registry's names and `extra_names` (service.job_env)."""
    allowed = set(BASE_ENV) | (set(REGISTRY_ENV) | set(extra_names) if trusted else set())
    env = {name: os.environ[name] for name in sorted(allowed) if name in os.environ}
    return env | (set_to or {})


def bubblewrap() -> str:
    found = shutil.which("bwrap")
    if found is None:
        raise SandboxUnavailable("bubblewrap is not installed, so pull-request code cannot be sandboxed",
                                 hint="install Debian's bubblewrap (apt-get install bubblewrap)")
    return found


def interpreter_paths() -> list[Path]:
    """Where this Python, its packages and the installed mlgate live: the sandbox needs them, read-only. A
    tree that carries its own mlgate (automation/, triggers/) runs that, being first on sys.path."""
    import automation
    import models
    import triggers

    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent.parent}
    paths |= {Path(package.__file__).resolve().parent for package in (automation, triggers, models)}   # type: ignore[arg-type]
    return sorted(p for p in paths if p.exists())


def sandboxed(command: list[str], *, cwd: Path, writable: Path, read_only: Iterable[Path] = (),
              env: dict[str, str] | None = None, tmp_mb: int = 1024) -> list[str]:
    """`command` wrapped in bubblewrap: nobody, new namespaces (user, PID, IPC, UTS, network), an empty
    environment plus `env`, the system's /usr (and its merged /bin, /lib), the interpreter, `cwd` and
    `read_only` read-only, `writable` read-write, a private /tmp of `tmp_mb`, and nothing else of this machine."""
    args = [bubblewrap(), "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
            "--unshare-cgroup-try", "--uid", NOBODY, "--gid", NOBODY, "--die-with-parent", "--new-session",
            "--proc", "/proc", "--dev", "/dev", "--size", str(tmp_mb * 1024 * 1024), "--tmpfs", "/tmp",
            "--clearenv"]
    for system in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/etc/alternatives", "/etc/ld.so.cache",
                   "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/ssl/certs", "/etc/localtime", "/etc/passwd",
                   "/etc/group", "/etc/nsswitch.conf"):
        if Path(system).exists():
            args += ["--ro-bind", system, system]
    for gpu in sorted(Path("/dev").glob("nvidia*")) + [Path("/dev/dri")]:   # a GPU runner's devices
        if gpu.exists():
            args += ["--dev-bind", str(gpu), str(gpu)]
    for path in [*interpreter_paths(), *read_only, cwd]:
        args += ["--ro-bind", str(path), str(path)]
    writable.mkdir(parents=True, exist_ok=True)
    args += ["--bind", str(writable), str(writable), "--chdir", str(cwd)]
    base = {"HOME": str(writable / "home"), "TMPDIR": "/tmp", "PYTHONDONTWRITEBYTECODE": "1",
            "MLGATE_DATA_CACHE": str(writable / "data-cache"), "MPLCONFIGDIR": str(writable / "home")}
    for name, value in (base | (env or {})).items():
        args += ["--setenv", name, value]
    return [*args, "--", *command]


# --- limits: what a sandboxed job may use -----------------------------------------------------------------

@dataclass
class Limits:
    """The resolved limits of one sandboxed process (service.sandbox_limits)."""
    address_space: int | None
    cpu_seconds: int
    file_size: int
    processes: int
    open_files: int
    tmp_mb: int
    workdir_bytes: int

    @classmethod
    def resolve(cls, config: SandboxLimits, job_timeout_minutes: float) -> "Limits":
        gpu = any(Path("/dev").glob("nvidia*"))
        cpu_minutes = config.cpu_minutes or job_timeout_minutes * usable_cpus()
        return cls(address_space=None if gpu or config.address_space_gb is None
                   else int(config.address_space_gb * 1024 ** 3),
                   cpu_seconds=int(cpu_minutes * 60), file_size=config.file_size_mb * 1024 ** 2,
                   processes=config.processes, open_files=config.open_files, tmp_mb=config.tmp_mb,
                   workdir_bytes=config.workdir_mb * 1024 ** 2)

    def apply(self) -> None:
        """In the child, before exec (inherited by bubblewrap and all it starts)."""
        limits = [(resource.RLIMIT_FSIZE, self.file_size),
                  (resource.RLIMIT_NPROC, self.processes), (resource.RLIMIT_NOFILE, self.open_files)]
        if self.address_space is not None:
            limits.append((resource.RLIMIT_AS, self.address_space))
        for which, value in limits:
            resource.setrlimit(which, (value, value))
        # SIGXCPU at the soft limit ends it with a signal that names the cause; SIGKILL (hard) would not
        resource.setrlimit(resource.RLIMIT_CPU, (self.cpu_seconds, self.cpu_seconds + 5))

    def reason(self, exit_code: int, log_tail: str) -> str | None:
        """Which limit ended the process, from how it ended; None when none did (as far as can be told)."""
        signalled = -exit_code if exit_code < 0 else exit_code - 128 if exit_code > 128 else 0
        if signalled == signal.SIGXCPU or (signalled == signal.SIGKILL and "CPU time limit" in log_tail):
            return f"it used its {self.cpu_seconds:,} s of CPU time (service.sandbox_limits.cpu_minutes)"
        if signalled == signal.SIGXFSZ or "File too large" in log_tail:
            return (f"it wrote a file over {self.file_size // 1024 ** 2:,} MB "
                    "(service.sandbox_limits.file_size_mb)")
        if any(sign in log_tail for sign in ("MemoryError", "std::bad_alloc", "Cannot allocate memory",
                                             "out of memory")):
            return "it ran out of memory under its limit (service.sandbox_limits.address_space_gb)"
        if any(sign in log_tail for sign in ("Cannot fork", "can't start new thread", "Resource temporarily "
                                             "unavailable", "fork: retry")):
            return f"it reached its {self.processes:,} processes (service.sandbox_limits.processes)"
        if "No space left on device" in log_tail:
            return f"it filled its {self.tmp_mb:,} MB /tmp (service.sandbox_limits.tmp_mb)"
        return None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class PidsCgroup:
    """A pids cgroup (v2, or v1's pids controller) capping a sandboxed job's processes, where the service may
    make one; `None` from `make` otherwise, and RLIMIT_NPROC alone stands."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def make(cls, name: str, processes: int) -> "PidsCgroup | None":
        for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/pids")):
            if not (root / "cgroup.procs").exists() or (root == Path("/sys/fs/cgroup") and
                                                        not (root / "cgroup.controllers").exists()):
                continue
            path = root / f"mlgate-{name}"
            try:
                path.mkdir(exist_ok=True)
                (path / "pids.max").write_text(str(processes))
                return cls(path)
            except OSError:
                with contextlib.suppress(OSError):
                    path.rmdir()
        return None

    def enter(self) -> None:
        """In the child, before exec; where it cannot, RLIMIT_NPROC stands alone."""
        with contextlib.suppress(OSError):
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def reached(self) -> bool:
        try:
            events = (self.path / "pids.events").read_text()
        except OSError:
            return False
        return any(line.split()[-1] != "0" for line in events.splitlines() if line.startswith("max"))

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


def workdir_bytes(root: Path, stop_at: int) -> int:
    """Bytes under `root` (links not followed), counting up to a little past `stop_at`; each entry counts a
    block too, so a flood of empty files counts."""
    total, stack = 0, [root]
    while stack and total <= stop_at:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    with contextlib.suppress(OSError):
                        total += entry.stat(follow_symlinks=False).st_size + 512
        except OSError:
            continue
    return total
