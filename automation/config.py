"""The `mlgate.yaml` schema. Unknown keys and wrong types fail before any work starts."""

from __future__ import annotations

import copy
import importlib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError, model_validator

from automation.errors import UsageError

DEFAULT_CONFIG = Path(__file__).with_name("default_config.yaml")

Variant = Literal["torch_eager", "torch_half", "torch_compile", "torch_aoti", "onnx_fp32", "onnx_int8", "onnx_cuda",
                  "tensorrt_fp16"]
ALL_VARIANTS: tuple[Variant, ...] = ("torch_eager", "torch_half", "torch_compile", "torch_aoti", "onnx_fp32",
                                     "onnx_int8", "onnx_cuda", "tensorrt_fp16")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainConfig(Strict):
    epochs: PositiveInt = 40
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    weight_decay: float = Field(0.0, ge=0)
    patience: PositiveInt = 6          # epochs without val-loss improvement before stopping
    seed: int = 0
    amp: bool = True                   # autocast on CUDA only; ignored on CPU
    distributed: Literal["auto", "off"] = "auto"   # auto: DDP over all GPUs when there are several
    # DataLoader worker processes reading a training split on disk (automation.data.DiskArray); 0 reads in the
    # training process. On a GPU runner, 2-4 keep the GPU fed while the next batches are read.
    loader_workers: NonNegativeInt = 0
    # onecycle: warm up to `lr`, then anneal; it reaches in a few epochs what a constant rate needs many for
    lr_schedule: Literal["constant", "onecycle"] = "constant"
    # a checkpoint at each epoch end and, within long epochs, this often: the next attempt resumes from it
    checkpoint_every_minutes: PositiveFloat = 10.0
    # SIGTERM (a spot runner's notice, a cancel, the job's time-out): finish the step, checkpoint, exit 75
    preemption_grace_seconds: PositiveFloat = 30.0
    # stop at this much training time (over all attempts) with the best weights so far; the report says so
    max_minutes: PositiveFloat | None = None
    # stop once validation accuracy cannot reach the absolute accuracy gate, assuming no remaining epoch gains
    # more than the largest one-epoch gain seen so far (checked from the third epoch on)
    abort_when_hopeless: bool = False
    # intra-op CPU threads while training (restored after): the thread count sets how float sums are split,
    # so the same commit, data and config give the same weights bit for bit only at the same count. Unset:
    # OMP_NUM_THREADS if set, else the CPUs this process may use, at most 8; set it to compare runs across
    # machines of other sizes
    threads: PositiveInt | None = None
    # machines to train across (kubernetes: an Indexed Job's pods; ray: one worker each), each with all of
    # `resources.gpus`; 1: one machine, every GPU on it (train.distributed)
    nodes: PositiveInt = 1


class DeviceConfig(Strict):
    """Where the job runs. Decided once per job (automation/device.py) and recorded in the report."""

    type: Literal["auto", "cuda", "cpu"] = "auto"   # auto: the first CUDA device when there is one
    # TF32 matmuls/convolutions on Ampere+ trade ~3 decimal digits for speed; off keeps fp32 comparable
    # across devices, and the parity tolerance follows whichever precision is in effect
    tf32: bool = False


class BenchmarkConfig(Strict):
    batch_sizes: list[PositiveInt] = [1, 32, 256]   # 256: where a GPU earns its keep
    warmup: int = Field(20, ge=0)
    iterations: PositiveInt = 200      # timed calls per round
    rounds: PositiveInt = 5            # interleaved rounds, at most; relative latency compares rounds
    # Timing stops after `min_rounds` once every contender's rounds agree at that batch size: the spread
    # (max - min) of its per-round p95s is within `steady_spread` of their median, or under `steady_floor_ms`
    # (scheduler jitter). All contenders stop together, so candidate and production keep equal round counts.
    # 3, not 2: with two rounds the gate's bootstrap over rounds has little to resample. A min_rounds above
    # rounds means: always run `rounds`.
    min_rounds: PositiveInt = 3
    steady_spread: float = Field(0.10, ge=0)
    steady_floor_ms: float = Field(0.005, ge=0)
    # A contender's round ends after `iterations` calls or this many seconds, whichever comes first (but never
    # before `min_iterations` calls): a 40 ms call needs no 200 samples a round, and 200 of them cost 8 s.
    max_round_seconds: PositiveFloat = 0.5
    min_iterations: PositiveInt = 20


class OptimizeConfig(Strict):
    variants: list[Variant] = list(ALL_VARIANTS)
    accuracy_tolerance: float = Field(0.005, ge=0, le=1)   # max accuracy loss vs fp32, as a fraction
    # max |Δlogit| of an fp32 artifact vs torch fp32 on the same device; None: derived from the precision
    # in effect (automation/parity.py), which is what you want unless a model needs a looser bound
    parity_atol: PositiveFloat | None = None
    select_batch_size: PositiveInt = 1                      # the batch size whose p50 picks the variant
    # torch.compile mode: reduce-overhead (CUDA graphs) compiles in seconds; max-autotune can take minutes
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = \
        "reduce-overhead"
    build_budget_seconds: PositiveFloat = 180               # per variant; a build over it is skipped
    # On a CPU runner the cheap variants are built and probed first (at select_batch_size): when one sure to
    # stay within accuracy_tolerance (ONNX Runtime, typically) is already this many times faster than
    # torch_eager, torch_compile and torch_aoti are skipped as unable to win (compiling torch rarely gains 2x
    # over eager on a CPU; they cost 30-70 s each to build here). On CUDA they are always built. None: always.
    skip_compile_when_onnx_speedup: PositiveFloat | None = 2.0
    # The probe, before the benchmark: a variant whose p50 at select_batch_size is more than this fraction
    # above the fastest one sure to stay within accuracy_tolerance cannot be chosen, so it is skipped, not
    # timed at every batch size. torch_eager is always timed. None: time every built variant.
    probe_margin: float | None = Field(0.25, ge=0)
    # Each variant's time in the benchmark (warm-up and timed calls at every batch size): one that passes it
    # stops being timed and is skipped with the reason. torch_eager and the probe's fastest are never capped.
    variant_seconds: PositiveFloat = 30


class AbsoluteGates(Strict):
    min_accuracy: float | None = Field(None, ge=0, le=1)
    min_macro_f1: float | None = Field(None, ge=0, le=1)
    max_p95_latency_ms: PositiveFloat | None = None         # chosen variant, batch 1
    max_size_mb: PositiveFloat | None = None


class RelativeGates(Strict):
    max_accuracy_drop: float | None = Field(0.01, ge=0, le=1)     # vs production, as a fraction
    max_latency_increase: float | None = Field(0.25, ge=0)        # p95 at batch 1, as a ratio minus 1


class GateConfig(Strict):
    absolute: AbsoluteGates = AbsoluteGates()
    relative: RelativeGates = RelativeGates()
    confidence: float = Field(0.95, gt=0.5, lt=1)
    latency_noise_floor_ms: float = Field(0.02, ge=0)   # p95 differences below this count as equal
    bootstrap_samples: PositiveInt = 2000
    # a candidate whose input contract or classes differ from production's: promote on the absolute gates
    # ("allow"), or fail the check "contract change" so a maintainer promotes it by hand ("approve")
    contract_change: Literal["allow", "approve"] = "allow"


class SplitConfig(Strict):
    """How mlgate splits data a loader returns unsplit (x, y or a DataFrame): stratified and seeded, so the
    same seed always gives the same test set."""

    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    seed: int = 0


class DriftPolicy(Strict):
    threshold: float = Field(0.3, gt=0, le=1)      # retrain when the share of drifted columns reaches this
    cooldown_minutes: float = Field(60, ge=0)      # after a drift retrain, later events only get recorded
    window_rows: PositiveInt = 5000                # `mlgate monitor`: newest rows of current data compared
    # a smaller window is not tested: with a few dozen rows, per-column tests flag chance differences as drift
    min_window_rows: PositiveInt = 100
    keep_reports: PositiveInt = 20                 # newest HTML reports kept per model; older ones are deleted


class RolloutStage(Strict):
    traffic: float = Field(ge=0, le=1)             # share the new version answers; 0: shadow (compared, never returned)
    min_seconds: float = Field(60, ge=0)           # the stage lasts at least this long
    min_requests: PositiveInt = 200                # and sees at least this many requests
    min_labels: NonNegativeInt = 0                 # and the rollout has this many labelled examples (POST /feedback)


class RolloutConfig(Strict):
    """`serve-model` after a promotion: the new version goes through these stages on live traffic, compared
    with the previous one; a stage it fails rolls production back (audited)."""

    stages: list[RolloutStage] = [RolloutStage(traffic=0), RolloutStage(traffic=0.05), RolloutStage(traffic=0.25)]
    min_agreement: float = Field(0.95, gt=0, le=1)   # same prediction as the previous version
    max_error_rate: float = Field(0.01, ge=0, le=1)  # the new version's inference failures
    max_latency_ratio: float = Field(1.5, gt=1)      # p95 and p99 against the previous version's
    latency_noise_floor_ms: float = Field(0.05, ge=0)  # a smaller latency gap is jitter, whatever the ratio
    # inference time per example (model calls only, no queue or batching wait) against the previous version's
    max_compute_ratio: float = Field(1.5, gt=1)
    compute_noise_floor_us: float = Field(2.0, ge=0)   # per example; a smaller gap is timer noise
    max_class_shift: float = Field(0.05, gt=0, le=1)   # change in any class's share of the predictions
    max_accuracy_drop: float = Field(0.01, ge=0, le=1)  # on labelled examples, where labels come back
    confidence: float = Field(0.95, gt=0.5, lt=1)


class JudgeConfig(Strict):
    """How the base branch judges an outsider's candidate (`mlgate run --judge`): the candidate sets none of it."""

    # Loop, Scan and If let a candidate run for as long as it likes per call; refused unless the model needs them
    allow_control_flow: bool = False
    call_timeout_seconds: PositiveFloat = 30       # one ONNX Runtime call on the candidate, then it is stopped
    # every call on the candidate together (evaluation and timing make hundreds: 30 s each would hold the
    # judge for hours); far above what the zoo's models need on a busy CPU, far below the job's time-out
    total_seconds: PositiveFloat = 1800


GIT_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
K8S_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"


class ResourcesConfig(Strict):
    """What one attempt of the model's job asks of the `kubernetes` and `ray` executors (per node)."""

    gpus: NonNegativeInt = 0                       # nvidia.com/gpu on Kubernetes, num_gpus on Ray
    cpus: PositiveFloat = 2
    memory: str = Field("8Gi", pattern=K8S_QUANTITY)   # a Kubernetes quantity; Ray gets the same bytes
    image: str | None = None                       # kubernetes: this model's image (default: service.kubernetes.image)
    node_selector: dict[str, str] = {}
    # Kubernetes tolerations, as a pod spec writes them (key, operator, value, effect, tolerationSeconds)
    tolerations: list[dict[str, str | int]] = []


class PromotionConfig(Strict):
    """Where production is declared (README: GitOps). `registry`: a passing gate moves the registry's alias.
    `pull_request`: it opens (or updates) a pull request changing the model's deploy file, and merging it
    promotes. `commit`: the service commits the deploy file to `service.branch` itself."""

    mode: Literal["registry", "pull_request", "commit"] = "registry"
    # the stages a version goes through, in order: with staging first, the production change is proposed only
    # once the staging rollout's analysis passed (serve-model --stage staging), and carries its figures
    stages: list[Literal["staging", "production"]] = ["production"]
    # an alias moved outside git: `restore` puts it back to what the deploy file declares; `report` only says so
    on_drift: Literal["restore", "report"] = "restore"

    @model_validator(mode="after")
    def _stages_in_order(self) -> "PromotionConfig":
        if self.stages not in (["production"], ["staging", "production"]):
            raise ValueError("stages is [production] or [staging, production]")
        return self


class ModelDefaults(Strict):
    """The `defaults:` block: every model key except `module`, checked on its own so errors point here."""

    params: dict[str, Any] = {}                    # passed to build(**params)
    data: dict[str, Any] = {}                      # passed to load_data(**data)
    split: SplitConfig = SplitConfig()             # for data load_data() returns unsplit
    paths: list[str] = []                          # extra files whose change retrains this model
    device: DeviceConfig = DeviceConfig()
    train: TrainConfig = TrainConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    optimize: OptimizeConfig = OptimizeConfig()
    gates: GateConfig = GateConfig()
    judge: JudgeConfig = JudgeConfig()
    drift: DriftPolicy = DriftPolicy()
    rollout: RolloutConfig | None = None           # none: a promotion switches all traffic at once
    resources: ResourcesConfig = ResourcesConfig()
    promotion: PromotionConfig = PromotionConfig()
    # merged over this block when the job's device is a CPU: a short config (fewer examples or epochs) for a
    # runner without a GPU, beside the full one. Any of the keys above; checked when the file is read.
    on_cpu: dict[str, Any] = {}


MAX_IMAGE_SIDE = 2048


class SourceConfig(Strict):
    """Data named in yaml instead of a loader (automation/data_sources.py): exactly one of the three."""

    images: str | None = None                      # a folder of <class>/<image file>, any size and colour
    # every image resized to (height, width); bounded: each image becomes C×H×W bytes in the data cache
    size: tuple[Annotated[int, Field(ge=1, le=MAX_IMAGE_SIDE)], Annotated[int, Field(ge=1, le=MAX_IMAGE_SIDE)]] = (64, 64)
    mode: Literal["RGB", "L"] = "RGB"              # colour (3 channels) or grey (1)
    texts: str | None = None                       # a folder of <class>/<file>.txt
    csv: str | None = None                         # a CSV file with a text column and a label column
    text: str = "text"
    label: str = "label"

    @model_validator(mode="after")
    def _exactly_one(self) -> "SourceConfig":
        named = [key for key in ("images", "texts", "csv") if getattr(self, key) is not None]
        if len(named) != 1:
            raise ValueError("name exactly one of images, texts or csv"
                             + (f" (got {', '.join(named)})" if named else ""))
        return self


class ModelConfig(ModelDefaults):
    module: str                                    # e.g. models.digits_mlp
    source: SourceConfig | None = None             # data named here; the module then needs only build()

    @model_validator(mode="after")
    def _staging_has_a_rollout(self) -> "ModelConfig":
        if "staging" in self.promotion.stages and self.promotion.mode != "registry" and self.rollout is None:
            raise ValueError("promotion.stages has staging, whose rollout's analysis proposes production: "
                             "the model needs a rollout: block")
        return self

    def for_cpu(self) -> "ModelConfig":
        """This block with `on_cpu` merged over it (itself when there is none)."""
        if not self.on_cpu:
            return self
        merged = _deep_merge(self.model_dump(exclude={"on_cpu"}), self.on_cpu)
        return ModelConfig.model_validate(merged)


class KafkaConfig(Strict):
    topic: str = "mlgate.drift"
    dead_letter_topic: str = "mlgate.drift.dead-letter"
    group_id: str = "mlgate"


class GitHubExecutorConfig(Strict):
    workflow: str = "retrain.yml"                  # file name under .github/workflows
    ref: str = "main"                              # branch the workflow file is taken from
    timeout_minutes: PositiveFloat = 120           # give up tracking a dispatched run after this
    # the runner's credential is a GitHub Actions OIDC token (triggers/jobs/oidc.py); an outsider's PR is judged by
    # this reusable workflow, the only one whose token may report for such a job
    judge_workflow: str = "judge.yml"
    oidc_audience: str = "mlgate"                  # the `aud` the jobs ask for (the workflow's MLGATE_OIDC_AUDIENCE)
    oidc_issuer: str = "https://token.actions.githubusercontent.com"
    oidc_jwks_url: str = "https://token.actions.githubusercontent.com/.well-known/jwks"


class KubernetesExecutorConfig(Strict):
    """`service.executor: kubernetes`: each attempt is a batch/v1 Job (triggers/jobs/kubernetes_executor.py)."""

    namespace: str = Field("mlgate", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    # mlgate and its dependencies, not the user's code: an init container checks the commit out
    image: str = "ghcr.io/mlgate/runner:latest"
    checkout_image: str = "alpine/git:2.47.2"      # runs `git fetch` of exactly the job's SHA
    repository_url: str = ""                       # https clone URL; empty: https://github.com/<GITHUB_REPOSITORY>
    # a Secret holding a read-only git credential (key `token`), for the checkout only; none: a public repository
    git_secret: str | None = None
    # a Secret whose keys become the environment of trusted jobs (retrains, the judge): MLFLOW_TRACKING_URI and
    # the registry's credentials. An outsider's build never gets it.
    env_secret: str | None = None
    service_url: str = ""                          # where pods report: POST <url>/jobs/{id}/result
    queue_name: str | None = None                  # a Kueue LocalQueue: Jobs wait suspended until admitted
    service_account: str | None = None             # trusted jobs' ServiceAccount; builds get none
    image_pull_secrets: list[str] = []
    candidate_storage: str = Field("2Gi", pattern=K8S_QUANTITY)   # the volume an outsider's build leaves its candidate on
    storage_class: str | None = None
    backoff_limit: NonNegativeInt = 2              # failed pods retried (evictions and preemptions never count)
    ttl_seconds_after_finished: NonNegativeInt = 3600
    log_limit_kb: PositiveInt = 4096               # each pod's log kept in the job's log, at most
    poll_seconds: PositiveFloat = 5.0              # how often the result is looked for between watch events
    # the kubeconfig context; None: in-cluster config when the service runs in a pod, else the current context
    context: str | None = None


class RayExecutorConfig(Strict):
    """`service.executor: ray`: each attempt is a Ray job submission (triggers/jobs/ray_executor.py)."""

    address: str = "http://127.0.0.1:8265"         # the head's dashboard (job submission API)
    service_url: str = ""                          # where jobs report: POST <url>/jobs/{id}/result
    poll_seconds: PositiveFloat = 2.0
    log_limit_kb: PositiveInt = 4096
    # a folder the service and every Ray node see at the same path (NFS, a shared volume): an outsider's tree
    # goes in and its candidate comes out there. None: <workdir>/exchange (a head on the service's machine)
    exchange_dir: Path | None = None
    # Ray's SIGKILL comes this long after the model's preemption grace (a checkpoint being written may finish)
    stop_grace_margin_seconds: PositiveFloat = 10
    # train.nodes > 1: how the nodes' bundles are placed. STRICT_SPREAD: one per machine; SPREAD: best effort
    placement_strategy: Literal["STRICT_SPREAD", "SPREAD", "PACK"] = "STRICT_SPREAD"


class GitOpsConfig(Strict):
    """Deploy files (automation/deploy_file.py) and the reconciler that makes the registry match them."""

    folder: str = Field("deploy", pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")   # in the repository
    reconcile_seconds: PositiveFloat = 60          # besides every push to service.branch
    author_name: str = "mlgate"                    # of the commits the service writes
    author_email: str = "mlgate@users.noreply.github.com"
    branch_prefix: str = Field("mlgate/promote", pattern=r"^[A-Za-z0-9_./-]+$")   # promotion PRs' branches

    @model_validator(mode="after")
    def _folder_inside(self) -> "GitOpsConfig":
        if ".." in self.folder.split("/") or "." in self.folder.split("/"):
            raise ValueError("folder is a path inside the repository, without '.' or '..'")
        # each part of a branch name as git takes it (check-ref-format): no '..', no empty part, none ending .lock
        if not all(GIT_SAFE_NAME.fullmatch(part) and not part.endswith(".lock")
                   for part in self.branch_prefix.split("/")):
            raise ValueError("branch_prefix is a branch name git takes: parts of letters, digits, '_', '-' and inner "
                             "'.', joined by '/'")
        return self


class SandboxLimits(Strict):
    """What a sandboxed pull-request job (its build, and the judge) may use. Reaching a limit ends the job
    with the limit named. Processes are capped with a pids cgroup where the service may make one, else with
    RLIMIT_NPROC (which binds a non-root service only)."""

    # RLIMIT_AS; not applied where a GPU is visible: CUDA reserves address space far beyond what it uses
    address_space_gb: PositiveFloat | None = 32
    cpu_minutes: PositiveFloat | None = None       # RLIMIT_CPU; default: service.job_timeout_minutes × CPUs
    file_size_mb: PositiveInt = 4096               # RLIMIT_FSIZE: the largest file it may write
    processes: PositiveInt = 512                   # threads count too
    open_files: PositiveInt = 4096
    tmp_mb: PositiveInt = 1024                     # /tmp is a tmpfs of this size
    workdir_mb: PositiveInt = 8192                 # its writable folder, measured while it runs


class ServiceConfig(Strict):
    """`mlgate serve` and `mlgate worker`: what turns events into jobs and where jobs run."""

    executor: Literal["local", "github", "kubernetes", "ray"] = "local"
    branch: str = "main"                           # what a job with no commit (manual, drift) runs: this branch's head
    # local executor: `commit` runs each job in a git worktree at its SHA (the commit's code and mlgate.yaml);
    # `in_place` runs the service's own files, for a folder that is not a git repository (the demo)
    checkout: Literal["commit", "in_place"] = "commit"
    github: GitHubExecutorConfig = GitHubExecutorConfig()
    kubernetes: KubernetesExecutorConfig = KubernetesExecutorConfig()
    ray: RayExecutorConfig = RayExecutorConfig()
    workers: int = Field(1, ge=0)                  # in-process workers in `mlgate serve` (0: workers run apart)
    max_concurrent_retrains: PositiveInt = 2       # across models; a model never runs two jobs at once
    max_attempts: PositiveInt = 3                  # a job whose worker dies is retried this many times in all
    # a preempted attempt (SIGTERM: checkpointed, exit 75) is requeued without counting toward max_attempts,
    # this many times at most
    max_preemptions: NonNegativeInt = 10
    lease_seconds: PositiveFloat = 60              # a worker that misses heartbeats this long loses its job
    job_timeout_minutes: PositiveFloat = 240       # a job still running after this is stopped and failed
    retention_days: PositiveFloat = 90             # finished jobs, deliveries and drift events older are pruned
    # a push touching any of these retrains every model (models/<name>.py files belong to their model)
    shared_paths: list[str] = ["automation/", "models/", "pyproject.toml"]
    # mlgate itself, the judge: a change here touches every model, and a PR changing it whose author cannot
    # write is never green (its statuses fail, and say a maintainer must review it)
    judge_paths: list[str] = ["automation/", "triggers/", ".github/", ".ci/", "Makefile", "pyproject.toml"]
    kafka: KafkaConfig = KafkaConfig()
    # what a local job may see beyond the allow-list (triggers/jobs/sandbox.py): environment variable names a
    # default-branch retrain also gets, and paths (data outside the repository) a sandboxed PR job may read
    job_env: list[str] = []
    sandbox_read_only: list[str] = []
    # a folder outside the repository holding <model>.npz (x, y): the judge of an outsider's PR measures on it
    # instead of the test split, which anyone can rebuild from the repository's loader and seed (and memorize).
    # The judge's sandbox reads it; the build's never does. None: the public test split, and the summary says so
    held_out_dir: Path | None = None
    sandbox_limits: SandboxLimits = SandboxLimits()
    # where a drift event's data_ref may point: absolute paths, file:// or other URI prefixes (s3://bucket/x/).
    # Anything else is refused before it is recorded; empty (the default): no event may name data.
    data_roots: list[str] = []
    replay_window_hours: PositiveFloat = 72        # a signed webhook body seen within this is not enqueued again
    # a PR from a fork whose author cannot write runs only once someone with write access adds this label
    approve_label: str = "mlgate:evaluate"
    gitops: GitOpsConfig = GitOpsConfig()

    @model_validator(mode="after")
    def _held_out_outside(self) -> "ServiceConfig":
        # relative would mean relative to a checkout: the folder must not be one the PR's tree could hold
        if self.held_out_dir is not None and not self.held_out_dir.is_absolute():
            raise ValueError(f"service.held_out_dir must be an absolute path outside the repository, not "
                             f"{str(self.held_out_dir)!r}")
        # the build's sandbox mounts sandbox_read_only too: a held-out set under one is a set the build can read
        shared = [p for p in self.sandbox_read_only if self.held_out_dir is not None
                  and self.held_out_dir.resolve().is_relative_to(Path(p).resolve())]
        if shared:
            raise ValueError(f"service.held_out_dir is inside sandbox_read_only's {shared[0]!r}, which every "
                             "pull request's build may read: keep the held-out set elsewhere")
        return self


class ReportingConfig(Strict):
    # promotions from push/drift jobs are announced here instead of on the commit
    tracking_issue: PositiveInt | None = None


class MlgateConfig(Strict):
    version: Literal[1] = 1
    workdir: Path = Path(".mlgate")                # local state: MLflow store, job DB, reports
    experiment: str = "mlgate"
    models: dict[str, ModelConfig]
    service: ServiceConfig = ServiceConfig()
    reporting: ReportingConfig = ReportingConfig()
    root: Path = Path(".")                         # mlgate.yaml's folder: a model's `source:` paths start here

    @model_validator(mode="after")
    def _has_models(self) -> "MlgateConfig":
        if not self.models:
            raise ValueError("at least one model is required under 'models'")
        for name, spec in self.models.items():   # the name becomes a file and a branch: git must take it
            if spec.promotion.mode != "registry" and (not GIT_SAFE_NAME.fullmatch(name) or name.endswith(".lock")):
                raise ValueError(f"model '{name[:80]}' promotes through git, so its name names a deploy file and a "
                                 "branch: letters, digits, '_', '-' and inner '.' only")
        return self

    def model(self, name: str) -> ModelConfig:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise UsageError(f"unknown model '{name}' (known: {known})") from None

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else self.workdir / path


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_defaults(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """`defaults:` is merged under every model block so each block stays small."""
    defaults = raw.pop("defaults", None) or {}
    try:
        ModelDefaults.model_validate(defaults)
    except ValidationError as exc:
        raise UsageError(_format_validation_error(source, exc, prefix="defaults")) from None
    models = raw.get("models")
    if isinstance(models, dict):
        raw["models"] = {name: _deep_merge(defaults, block) if isinstance(block, dict) else block
                         for name, block in models.items()}
    return raw


def _format_validation_error(source: str, error: ValidationError, prefix: str = "") -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "") or "(top level)"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{source}: {where}: {first['msg']}{more}"


def parse_config(text: str, source: str, base_dir: Path) -> MlgateConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UsageError(f"{source}:{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: the top level must be a mapping with a 'models' key")
    try:
        config = MlgateConfig.model_validate(_apply_defaults(raw, source))
    except ValidationError as exc:
        raise UsageError(_format_validation_error(source, exc)) from None
    for name, spec in config.models.items():   # a bad key in on_cpu fails now, not on the first CPU runner
        try:
            spec.for_cpu()
        except ValidationError as exc:
            raise UsageError(_format_validation_error(source, exc, prefix=f"models.{name}.on_cpu")) from None
    # MLGATE_WORKDIR: a job run from a checkout of another commit keeps the service's state and reports
    workdir = Path(os.environ.get("MLGATE_WORKDIR") or config.workdir)
    workdir = workdir if workdir.is_absolute() else (base_dir / workdir)
    held_out = config.service.held_out_dir
    if held_out is not None and held_out.resolve().is_relative_to(base_dir.resolve()):   # the build's own tree
        raise UsageError(f"{source}: service.held_out_dir {held_out} is inside the repository ({base_dir}), which "
                         "a pull request's build reads: keep the held-out set outside it")
    return config.model_copy(update={"workdir": workdir.resolve(), "root": base_dir.resolve()})


def load_config(path: str | os.PathLike[str] | None = None) -> MlgateConfig:
    """Load `path`, or ./mlgate.yaml, or the embedded defaults, in that order."""
    if path is None:
        path = Path("mlgate.yaml") if Path("mlgate.yaml").exists() else DEFAULT_CONFIG
        base_dir = Path.cwd()
    else:
        path = Path(path)
        base_dir = path.resolve().parent
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror}") from None
    return parse_config(text, str(path), base_dir)


def check_model_module(name: str, spec: ModelConfig) -> Any:
    """Import a model's module and check its contract before any GPU time is spent."""
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise UsageError(f"models.{name}.module: cannot import '{spec.module}': {exc}") from None
    for attr in ("build",) if spec.source is not None else ("build", "load_data"):
        if not callable(getattr(module, attr, None)):
            raise UsageError(f"models.{name}.module: '{spec.module}' has no function '{attr}'",
                             hint="a model file defines build(**params), and load_data(**data) unless the "
                                  "model block names a `source:`")
    return module
