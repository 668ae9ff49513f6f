"""What a local job's process may see: an environment built from an allow-list, and for PR jobs a
bubblewrap sandbox (Debian's `bubblewrap`).

Every job's environment is built up from names, never filtered down: a secret someone adds next is not
passed on because nobody listed it. A PR job runs as `nobody` in its own user, PID, IPC and network
namespaces. It sees the interpreter, its own tree (read-only), the data it is given (read-only), one
writable folder, and nothing of the service: not its /proc, not its state, not a network.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

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
              env: dict[str, str] | None = None) -> list[str]:
    """`command` wrapped in bubblewrap: nobody, new namespaces (user, PID, IPC, UTS, network), an empty
    environment plus `env`, the system's /usr (and its merged /bin, /lib), the interpreter, `cwd` and
    `read_only` read-only, `writable` read-write, a private /tmp, and nothing else of this machine."""
    args = [bubblewrap(), "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
            "--unshare-cgroup-try", "--uid", NOBODY, "--gid", NOBODY, "--die-with-parent", "--new-session",
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--clearenv"]
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
