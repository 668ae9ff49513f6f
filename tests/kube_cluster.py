"""A Kubernetes control plane for tests, and the kubelet it lacks.

No package these machines can install ships a kube-apiserver, so the API is kmock's emulator, given the few
things a real server does that the executor relies on (uids, resource versions, label and field selectors,
Secrets' stringData, `410 Gone` on demand, pod logs). `Kubelet` moves pods as the tests need: it plays the
Job controller (one pod at a time, podFailurePolicy, backoffLimit, Complete/Failed conditions) and runs each
pod's containers as local processes, their volumes as folders, so the commands, environment and mounts the
manifests declare are exactly what runs. `evict()` is a preemption: the `DisruptionTarget` condition, then
SIGTERM, as the eviction API does.

With MLGATE_TEST_KUBECONFIG the same tests run against a real API server with its Job controller; this
kubelet then only binds and runs the pods the controller creates (through the binding and status
subresources), so a control plane without kubelets is enough.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp.web
import kmock
import yaml

_versions = itertools.count(1000)


def _matches(labels: dict[str, str], selector: str | None) -> bool:
    for term in filter(None, (selector or "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def _selected(obj: dict[str, Any], params: Any) -> bool:
    metadata = obj.get("metadata") or {}
    if not _matches(metadata.get("labels") or {}, params.get("labelSelector")):
        return False
    field = params.get("fieldSelector") or ""
    return not field.startswith("metadata.name=") or metadata.get("name") == field.split("=", 1)[1]


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with uids, resource versions, selectors, Secret data, pod logs and injected 410s."""

    pod_logs: dict[str, bytes]
    expire_watches: int

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.pod_logs, self.expire_watches = {}, 0
        for resource in ("batch/v1/jobs", "v1/pods", "v1/secrets", "v1/services", "v1/persistentvolumeclaims",
                         "networking.k8s.io/v1/networkpolicies"):
            self.resources[resource] = {}

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.url.path.endswith("/log"):   # pods/log: what the kubelet captured so far
            name = request.url.path.split("/")[-2]
            return aiohttp.web.Response(body=self.pod_logs.get(name, b""), content_type="text/plain")
        if request.resource is not None and isinstance(request.data, dict) and request.method.name in (
                "POST", "PATCH", "PUT"):
            metadata = request.data.setdefault("metadata", {})
            metadata["resourceVersion"] = str(next(_versions))
            if request.method.name == "POST":
                metadata.setdefault("uid", str(uuid.uuid4()))
                metadata.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                if "stringData" in request.data:   # as the API server stores it
                    request.data["data"] = {k: base64.b64encode(v.encode()).decode()
                                            for k, v in request.data.pop("stringData").items()}
        return await super()._handle(request)

    async def _serve_list(self, request: kmock.Request) -> Any:
        listed = await super()._serve_list(request)
        return {"metadata": {"resourceVersion": str(next(_versions))},
                "items": [o for o in listed["items"] if _selected(o, request.params)]}

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        if self.expire_watches > 0:   # the version asked for was compacted away
            self.expire_watches -= 1
            yield b""
            yield {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                               "reason": "Expired", "code": 410, "message": "too old"}}
            return
        # timeoutSeconds ends the watch, as an API server does (kmock's never ends one: a client then waits for its
        # own read timeout, e.g. the executor for 10 s at each Job's end, on a watch that no longer matters)
        timeout = float(request.params.get("timeoutSeconds") or 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        events = super()._serve_watch(request).__aiter__()
        try:
            while True:
                try:
                    if timeout:
                        event = await asyncio.wait_for(events.__anext__(), max(0.0, deadline - loop.time()))
                    else:
                        event = await events.__anext__()
                except (StopAsyncIteration, asyncio.TimeoutError):
                    return
                if not isinstance(event, dict) or _selected(event.get("object") or {}, request.params):
                    yield event
        finally:
            await events.aclose()


class EmulatedApiServer:
    """The emulator on a loopback port, on its own event loop thread; `kubeconfig` points a client at it."""

    def __init__(self, directory: Path) -> None:
        self.emulator: Emulator | None = None
        self._ready, self._stop = threading.Event(), None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("the emulated API server did not start")
        self.kubeconfig = directory / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulated",
            "clusters": [{"name": "emulated", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "not-checked"}}],
            "contexts": [{"name": "emulated", "context": {"cluster": "emulated", "user": "tester"}}]}))

    def _serve(self) -> None:
        async def main() -> None:
            self._stop, self._loop = asyncio.Event(), asyncio.get_running_loop()
            async with Emulator() as emulator, kmock.Server(emulator) as server:
                self.emulator, self.url = emulator, str(server.url).rstrip("/")
                self._ready.set()
                await self._stop.wait()

        asyncio.run(main())

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def client_for(kubeconfig: Path) -> Any:
    from kubernetes import config

    return config.new_client_from_config(config_file=str(kubeconfig))


class RunningPod:
    def __init__(self, name: str, job: str, process: subprocess.Popen[bytes] | None) -> None:
        self.name, self.job, self.process = name, job, process
        self.evicted = self.ended = False   # ended: its end is in the API (the pod's status, the Job's)


class Kubelet:
    """Runs the cluster's pods here. `controller=True` (the emulator) also plays the Job controller."""

    def __init__(self, client: Any, namespace: str, root: Path, emulator: Emulator | None,
                 rewrite_python: str = sys.executable, controller: bool = True) -> None:
        from kubernetes import client as k8s

        self.batch, self.core = k8s.BatchV1Api(client), k8s.CoreV1Api(client)
        self.namespace, self.root, self.emulator = namespace, root, emulator
        self.python, self.controller = rewrite_python, controller
        self.pods: dict[str, RunningPod] = {}
        self.failures: dict[str, int] = {}
        self.started: list[str] = []
        self.hold = threading.Event()   # set: pods are created but not started (Kueue, a full cluster)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "Kubelet":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for pod in self.pods.values():
            if pod.process is not None and pod.process.poll() is None:
                os.killpg(pod.process.pid, signal.SIGKILL)

    # --- the Job controller ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self._tick()
            except Exception as exc:   # keep the cluster going; the test sees what did not happen
                print(f"kubelet: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)

    def _tick(self) -> None:
        jobs = {j.metadata.name: self.batch.api_client.sanitize_for_serialization(j)
                for j in self.batch.list_namespaced_job(self.namespace).items}
        with self._lock:
            for pod in self.pods.values():   # a deleted Job's pods go with it
                if pod.job not in jobs and pod.process is not None and pod.process.poll() is None:
                    os.killpg(pod.process.pid, signal.SIGTERM)
        if not self.controller:
            return self._bind_new_pods(jobs)
        for name, job in jobs.items():
            if job["spec"].get("suspend") or _finished(job) or self.hold.is_set():
                continue
            if not any(p.job == name and not p.ended for p in self.pods.values()):   # one pod at a time
                self._start_pod(job)

    def _start_pod(self, job: dict[str, Any]) -> None:
        name = f"{job['metadata']['name']}-{len([p for p in self.pods.values() if p.job == job['metadata']['name']])}"
        template = job["spec"]["template"]
        labels = {**(template["metadata"].get("labels") or {}), "job-name": job["metadata"]["name"]}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
               "spec": template["spec"]}
        self.core.create_namespaced_pod(self.namespace, pod)
        running = RunningPod(name, job["metadata"]["name"], None)
        self.pods[name] = running
        self.started.append(name)
        threading.Thread(target=self._run_pod, args=(running, job), daemon=True).start()

    def _bind_new_pods(self, jobs: dict[str, dict[str, Any]]) -> None:
        """A real cluster's Job controller made the pods: bind each to this "node" and run it."""
        for pod in self.core.list_namespaced_pod(self.namespace, label_selector="app.kubernetes.io/name=mlgate").items:
            owner = (pod.metadata.labels or {}).get("job-name")
            if pod.metadata.name in self.pods or pod.spec.node_name or pod.metadata.deletion_timestamp \
                    or owner not in jobs:
                continue
            self.core.create_namespaced_pod_binding(pod.metadata.name, self.namespace, {
                "apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod.metadata.name},
                "target": {"apiVersion": "v1", "kind": "Node", "name": "mlgate-test-node"}}, _preload_content=False)
            running = RunningPod(pod.metadata.name, owner, None)
            self.pods[pod.metadata.name] = running
            self.started.append(pod.metadata.name)
            threading.Thread(target=self._run_pod, args=(running, jobs[owner]), daemon=True).start()

    def pods_of(self, job: str) -> list[str]:
        """The pods this kubelet ran for a Job, in the order they started."""
        return [name for name in self.started if self.pods[name].job == job]

    def _pod_ended(self, running: RunningPod, job: dict[str, Any], code: int) -> None:
        conditions = [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}] \
            if running.evicted else []
        phase = "Succeeded" if code == 0 else "Failed"
        self.core.patch_namespaced_pod_status(running.name, self.namespace, {"status": {
            "phase": phase, "conditions": conditions,
            "containerStatuses": [{"name": "mlgate", "ready": False, "restartCount": 0, "image": "i", "imageID": "",
                                   "state": {"terminated": {"exitCode": code}}}]}})
        if not self.controller:
            return   # the cluster's Job controller takes it from the pod's status
        name = job["metadata"]["name"]
        try:
            current = self.batch.api_client.sanitize_for_serialization(self.batch.read_namespaced_job(name, self.namespace))
        except Exception:
            return   # deleted meanwhile
        if code == 0:
            return self._condition(name, "Complete", "Completed", "")
        if running.evicted:   # podFailurePolicy: Ignore: the next pod goes on, uncounted
            return
        for rule in current["spec"].get("podFailurePolicy", {}).get("rules", []):
            codes = (rule.get("onExitCodes") or {}).get("values") or []
            if rule["action"] == "FailJob" and code in codes:
                return self._condition(name, "Failed", "PodFailurePolicy", f"container mlgate exited with {code}")
        self.failures[name] = self.failures.get(name, 0) + 1
        if self.failures[name] > current["spec"].get("backoffLimit", 6):
            self._condition(name, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")

    def _condition(self, job: str, kind: str, reason: str, message: str) -> None:
        self.batch.patch_namespaced_job_status(job, self.namespace, {"status": {"conditions": [
            {"type": kind, "status": "True", "reason": reason, "message": message}]}})

    # --- the kubelet -----------------------------------------------------------------------------------
    def _run_pod(self, running: RunningPod, job: dict[str, Any]) -> None:
        spec = job["spec"]["template"]["spec"]
        folder = self.root / "pods" / running.name
        paths = self._volumes(spec, folder, job)
        self.core.patch_namespaced_pod_status(running.name, self.namespace, {"status": {"phase": "Running"}})
        code = 0
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            code = self._run_container(running, container, paths, folder)
            if code != 0:
                break
        try:
            self._pod_ended(running, job, code)
        finally:
            running.ended = True

    def _volumes(self, spec: dict[str, Any], folder: Path, job: dict[str, Any]) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:   # a claim outlives pods: one folder per claim
                path = self.root / "volumes" / volume["persistentVolumeClaim"]["claimName"]
            else:
                path = folder / "volumes" / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            if "secret" in volume:
                secret = self.core.read_namespaced_secret(volume["secret"]["secretName"], self.namespace)
                for key, value in (secret.data or {}).items():
                    (path / key).write_bytes(base64.b64decode(value))
            paths[volume["name"]] = path
        return paths

    def _env(self, container: dict[str, Any]) -> dict[str, str]:
        env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
        for source in container.get("envFrom", []):
            secret = self.core.read_namespaced_secret(source["secretRef"]["name"], self.namespace)
            env |= {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
            elif "secretKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["secretKeyRef"]
                secret = self.core.read_namespaced_secret(ref["name"], self.namespace)
                env[item["name"]] = base64.b64decode(secret.data[ref["key"]]).decode()
        return env

    def _run_container(self, running: RunningPod, container: dict[str, Any], paths: dict[str, Path],
                       folder: Path) -> int:
        mounts: list[tuple[str, Path]] = []
        for mount in container.get("volumeMounts", []):
            host = paths[mount["name"]] / mount.get("subPath", "")
            host.mkdir(parents=True, exist_ok=True)
            mounts.append((mount["mountPath"], host))
        mounts.sort(key=lambda m: len(m[0]), reverse=True)

        def here(text: str) -> str:
            for inside, host in mounts:
                if text == inside or text.startswith(inside + "/"):
                    return str(host) + text[len(inside):]
                text = text.replace(f" {inside}/", f" {host}/").replace(f'"{inside}/', f'"{host}/')
            return text

        command = [here(part) for part in [*container.get("command", []), *container.get("args", [])]]
        if command and command[0] == "python":
            command[0] = self.python   # mlgate's image: this environment
        env = {k: here(v) for k, v in self._env(container).items()}
        cwd = Path(here(container.get("workingDir", str(folder))))
        cwd.mkdir(parents=True, exist_ok=True)
        log = folder / f"{container['name']}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            running.process = process
            code = process.wait()
        if self.emulator is not None and container["name"] == "mlgate":
            self.emulator.pod_logs[running.name] = log.read_bytes()
        return code

    # --- what the tests drive ----------------------------------------------------------------------------
    def evict(self, pod_name: str) -> None:
        """The eviction API: the pod gets the DisruptionTarget condition, then SIGTERM and its grace period."""
        running = self.pods[pod_name]
        running.evicted = True
        self.core.patch_namespaced_pod_status(pod_name, self.namespace, {"status": {"conditions": [
            {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]}})
        if running.process is not None:
            os.killpg(running.process.pid, signal.SIGTERM)

    def log_of(self, pod_name: str, container: str = "mlgate") -> str:
        path = self.root / "pods" / pod_name / f"{container}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _finished(job: dict[str, Any]) -> bool:
    return any(c.get("status") == "True" and c.get("type") in ("Complete", "Failed")
               for c in (job.get("status") or {}).get("conditions") or [])


def bare_remote(repo: Path, directory: Path) -> str:
    """A bare clone that serves any commit by its SHA (as GitHub does), as a file:// URL."""
    bare = directory / "remote.git"
    shutil.rmtree(bare, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True)
    subprocess.run(["git", "-C", str(bare), "config", "uploadpack.allowAnySHA1InWant", "true"], check=True)
    return bare.resolve().as_uri()


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="mlgate-kube-"))
