"""One whole job: validate → train → optimize → benchmark → gate → register → promote → report.

Everything the job decides is in the returned summary (the CLI's `--json` line). Stage
wall times are recorded so the cost of everything around training is visible.

`run_job` only conducts: each stage is a function of what the stages before it produced, handed on in
small dataclasses, so one stage reads (and changes) without the rest of the job in view.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import platform
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from automation.config import MlgateConfig, ModelConfig, PromotionConfig, check_model_module
from automation.cost import StageTimer
from automation.device import CPU, RunnerDevice, host_copy, select_device
from automation.errors import GateFailed, GateStale, StageError, UsageError, failure_reason
from automation.progress import JobProgress
from automation.redaction import redact_url
from automation.data import DataMissing
from automation.threads import policy as thread_policy, set_torch_inter_op

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from sqlalchemy import Engine

    from automation.gate import Verdict
    from automation.optimize import Variant
    from automation.parity import Parity
    from automation.production import ProductionSnapshot
    from automation.train import TrainResult
    from automation.data import Splits

log = logging.getLogger(__name__)

Trigger = Literal["manual", "push", "pr", "drift"]
REFERENCE_FILE = "train.npz"          # logged under the run's `reference/` artifacts

# What the stages import, loaded (in this order) before the first stage timer starts: a stage's time is its
# work, not loading torch, ONNX Runtime or MLflow.
_STAGE_MODULES = ("benchmark", "contract", "gate", "optimize", "promote", "proposals", "report", "store", "tracking",
                  "train", "predictors")


@dataclass
class JobRequest:
    model: str
    trigger: Trigger = "manual"
    sha: str | None = None
    pr: int | None = None
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    fresh_data: str | None = None        # labelled examples after drift, appended to the training split
    production_dir: Path | None = None   # a snapshot (automation/production.py): the registry is not read
    # an untrusted PR's two halves (automation/candidate.py): its code trains and exports a candidate folder,
    # then the service's own code judges that folder instead of training
    export_candidate: Path | None = None
    judge_candidate: Path | None = None
    # the service's held-out examples (.npz, x and y) the judge measures on instead of the public test split
    held_out: Path | None = None
    fence: Any = None                    # promote.Fence: refuses the promotion once this run lost its job
    # training resumes from, and checkpoints into, this folder: the same job's next attempt finds it there
    checkpoint_dir: Path | None = None
    checkpoint_mirror: Any = None        # checkpoint.ArtifactMirror: a retry on another runner resumes from there
    notice: Any = None                   # checkpoint.PreemptionNotice: SIGTERM checkpoints and stops training
    # what this job's earlier attempts spent, as the service recorded them: {count, preempted, seconds}
    earlier_attempts: dict[str, Any] | None = None

    @property
    def may_promote(self) -> bool:
        return self.trigger != "pr"   # a PR job evaluates; it never promotes


def fingerprint(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def environment_info(runner: RunnerDevice) -> dict[str, str]:
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "cuda": str(torch.version.cuda), "platform": platform.platform(), **runner.describe()}


def _flat_params(spec: ModelConfig) -> dict[str, Any]:
    flat = {f"model.{k}": v for k, v in spec.params.items()}
    flat |= {f"data.{k}": v for k, v in spec.data.items()}
    flat |= {f"train.{k}": v for k, v in spec.train.model_dump().items()}
    flat |= {f"optimize.{k}": v for k, v in spec.optimize.model_dump().items()}
    return flat


def _pip_requirements(*packages: str) -> list[str]:
    from importlib.metadata import version

    # MLflow would record torch==X+cpu; the local label breaks installs elsewhere
    return [f"{p}=={version(p).split('+')[0]}" for p in packages]


def run_job(config: MlgateConfig, request: JobRequest, progress: JobProgress | None = None) -> dict[str, Any]:
    """Run one job; returns the summary. Raises GateFailed (exit 3) after reporting a failed gate. A job that
    ends (succeeded, gate failed, failed) deletes its checkpoints; a preempted one keeps them to resume."""
    try:
        summary = run_stages(config, request, progress)
    except Exception as exc:
        end_checkpoints(request, exc)
        raise
    end_checkpoints(request, None)
    return summary


def end_checkpoints(request: JobRequest, error: BaseException | None) -> None:
    """Delete the job's checkpoints (its folder and the artifact store's copies) once no attempt will resume
    from them: every end but a preemption. Kept, a finished job's final checkpoint made a rerun under the
    same job id train nothing and register the old weights."""
    from automation.checkpoint import CheckpointDir, Preempted

    preempted = isinstance(error, Preempted) or (request.notice is not None and request.notice.requested.is_set())
    if request.checkpoint_dir is None or preempted:
        return
    why = "the job succeeded" if error is None else f"the job ended: {type(error).__name__}"
    CheckpointDir(request.checkpoint_dir, mirror=request.checkpoint_mirror).clear(why)


def run_stages(config: MlgateConfig, request: JobRequest, progress: JobProgress | None = None) -> dict[str, Any]:
    """The job's stages, validate to report; run_job wraps them with the checkpoints' end."""
    for name in _STAGE_MODULES:
        importlib.import_module(f"automation.{name}")
    set_torch_inter_op(1)   # the thread policy: the zoo's graphs are chains
    progress = progress or JobProgress(enabled=False)
    timer = StageTimer(on_stage=lambda name: progress.record(stage=name))
    spec = config.model(request.model)
    job_dir = config.workdir / "jobs" / request.job_id
    report_dir = config.workdir / "reports" / request.job_id

    with timer.stage("validate"):
        validated = validate(config, request, spec)
    spec = validated.spec   # with `on_cpu` merged in on a runner without a GPU
    timer.use_device(validated.runner)
    if request.export_candidate is not None:   # untrusted code: train, hand the artifact over, judge nothing
        return export_job(request, spec, validated, timer)
    if follower_node() is not None:   # one node's share of a multi-node training: node 0 does the rest
        return share_job(request, spec, validated, timer, progress)
    with timer.stage("connect"):
        connected = connect(config, request)

    import mlflow

    with mlflow.start_run(experiment_id=connected.experiment_id, run_name=f"{request.model}-{request.job_id}") as run:
        log_run_inputs(request, spec, validated)
        trained: TrainResult | None = None
        if request.judge_candidate is not None:   # trusted code, judging an untrusted build's artifact
            with timer.stage("load candidate"):
                if request.held_out is not None:   # before the candidate's tokenizer encodes the test texts
                    held_out_stage(request.held_out, validated)
                optimized = candidate_stage(request.judge_candidate, validated)
        else:
            with timer.stage("train"):
                trained = train_stage(request, spec, validated, progress)
            with timer.stage("optimize"):
                optimized = optimize_stage(config, spec, validated, trained, job_dir)
        with timer.stage("benchmark"):
            benchmarked = benchmark_stage(request.model, spec, validated, connected, optimized.variants, job_dir,
                                          progress)
        with timer.stage("gate"):
            verdict = gate_stage(spec, benchmarked)
        version, logged = None, {}
        if trained is not None:   # a judged candidate is never registered: its PR job may not promote anyway
            with timer.stage("register"):
                version, logged = register_stage(request, connected.client, validated, trained, optimized.variants,
                                                 benchmarked.chosen, verdict.passed, job_dir)
            if version is not None:
                with timer.stage("serve check"):
                    served_stage(request, connected.client, validated, benchmarked.chosen, verdict, version, job_dir)
        summary = build_summary(config, request, run.info.run_id, validated, connected, trained, optimized,
                                benchmarked, verdict, version, report_dir) | logged
        with timer.stage("promote"):
            promoted = promote_stage(request, connected, benchmarked.chosen, verdict, version,
                                     summary["reports"]["html"], spec.promotion)
            summary |= promoted.summary_fields()
        with timer.stage("report"):
            summary["cost"] = timer.summary(summary["training"], request.earlier_attempts)
            report_stage(summary, dict(timer.seconds), optimized.variants, benchmarked.production, report_dir,
                         validated.raw.x_test)
        summary["cost"] = timer.summary(summary["training"], request.earlier_attempts)   # the report stage too
        log_cost(summary["cost"])
        publish_summary(summary, dict(timer.seconds), report_dir)

    return conclude(request, summary, verdict, promoted)


# --- validate: the whole job's inputs are checked before any training time is spent ---------------------------

@dataclass
class Validated:
    """What validation established about the job's inputs; later stages read these, never the model file."""
    splits: Splits
    build: Callable[..., Any]             # the model's build(), checked on two test examples
    data_fingerprint: str
    batch_sizes: list[int]                # always 1, the selection batch size and the benchmark's
    runner: RunnerDevice                  # the one device every stage of this job runs on
    env: dict[str, str]
    described: dict[str, Any]             # the data contract, logged as contract.json and into the MLmodel
    spec: ModelConfig                     # the model's block as this runner runs it (`on_cpu` merged on a CPU)
    profile: str                          # "on_cpu" when that block was merged in, else "default"
    raw: Splits                           # the examples as clients send them (a text model's strings)
    encoder: Any = None                   # a text model's fitted tokenizer (automation/preprocess.TextEncoder)
    manifest: list[dict[str, Any]] = field(default_factory=list)   # the source files behind the fingerprint
    held_out: str | None = None           # a judge's test split, when the service's held-out set replaced it
    served: dict[str, np.ndarray] = field(default_factory=dict)   # test examples as serving decodes requests

    @property
    def kind(self) -> str:
        return str(self.described["input_kind"])


def validate(config: MlgateConfig, request: JobRequest, spec: ModelConfig) -> Validated:
    """Check the model file, its data and its build(), and decide the device: every way a job's inputs can be
    wrong fails here, before an MLflow run starts."""
    from automation.fingerprint import data_fingerprint

    runner = select_device(spec.device)   # the one place a job's device is decided; a CPU runner runs `on_cpu`
    profile = "on_cpu" if spec.on_cpu and not runner.is_cuda else "default"
    if profile == "on_cpu":
        spec = spec.for_cpu()
    module = model_module(config, request.model, spec)
    checked = load_checked_data(request.model, module, spec, request.fresh_data)
    digest, manifest = data_fingerprint(checked.raw, config.workdir / "cache" / "manifests.json")
    batch_sizes = sorted({1, spec.optimize.select_batch_size, *spec.benchmark.batch_sizes})
    env = environment_info(runner) | {"threads": thread_policy(spec.train.threads).describe()}
    log.info("resolved config", extra={"model": request.model, "job_id": request.job_id,
                                       "config": spec.model_dump(), "data_fingerprint": digest,
                                       "source_files": len(manifest),
                                       "data": {k: v for k, v in checked.described.items() if k != "features"}})
    return Validated(splits=checked.splits, build=checked.build, data_fingerprint=digest,
                     batch_sizes=batch_sizes, runner=runner, env=env, described=checked.described, spec=spec,
                     profile=profile,
                     raw=checked.raw, encoder=checked.encoder, manifest=manifest, served=checked.served)


# --- connect: the tracking server, the store, and the production version to compare with ----------------------

@dataclass
class Connected:
    """Where this job records, and the production version it is compared with (read once, here)."""
    client: MlflowClient
    experiment_id: str
    engine: Engine
    production_version: str | None
    snapshot: ProductionSnapshot | None   # set when trusted code handed the job a production snapshot


def connect(config: MlgateConfig, request: JobRequest) -> Connected:
    """Open the tracking server and the store, and read production: from the snapshot when one was handed in,
    otherwise from the registry after settling any move whose mover died."""
    from automation import promote, store, tracking

    client, experiment_id = tracking.connect(config.workdir, config.experiment)
    engine = store.open_store(store.database_url(config.workdir))
    snapshot = None
    if request.production_dir is not None:   # handed in by trusted code: this job never reads the registry
        from automation.production import read_production

        snapshot = read_production(request.production_dir, request.model)
        production_version = snapshot.version
    else:
        promote.reconcile(client, engine, request.model)   # a move whose mover died settles before we read
        production_version = promote.alias_version(client, request.model, promote.PRODUCTION)
    return Connected(client=client, experiment_id=experiment_id, engine=engine,
                     production_version=production_version, snapshot=snapshot)


def log_run_inputs(request: JobRequest, spec: ModelConfig, validated: Validated) -> None:
    """Tag the run with who asked and on what, and log the config and data contract: a run explains itself."""
    import mlflow

    mlflow.set_tags({"mlgate.model": request.model, "mlgate.job_id": request.job_id,
                     "mlgate.trigger": request.trigger, "mlgate.data_fingerprint": validated.data_fingerprint,
                     "mlflow.source.git.commit": request.sha or "", "mlgate.pr": str(request.pr or "")}
                    | {f"env.{k}": v for k, v in validated.env.items()})
    mlflow.log_params(_flat_params(spec) | ({"data.fresh": request.fresh_data} if request.fresh_data else {}))
    mlflow.log_dict(validated.described, "contract.json")
    if validated.manifest:   # which files, with their hashes, the version was trained and tested on
        mlflow.log_dict({"fingerprint": validated.data_fingerprint, "files": validated.manifest},
                        "data_manifest.json")


# --- train ------------------------------------------------------------------------------------------------------

def train_stage(request: JobRequest, spec: ModelConfig, validated: Validated, progress: JobProgress) -> TrainResult:
    """Train on the job's device, logging each epoch's metrics as it ends: the run's curves fill in live."""
    import mlflow

    from automation import train

    epochs = spec.train.epochs
    with progress.task(f"train {request.model}", epochs) as advance:
        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            mlflow.log_metrics(metrics, step=epoch)
            advance(1)
            seconds = metrics.get("epoch_seconds", 0.0)
            progress.record(stage="train", epoch=epoch, epochs=epochs, val_accuracy=metrics["val_accuracy"],
                            val_loss=metrics["val_loss"], eta_seconds=round(seconds * (epochs - epoch), 1))

        trained = train.train_model(validated.build, spec.params, validated.splits, spec.train,
                                    device=validated.runner, on_epoch=on_epoch,
                                    **training_options(request, spec, validated))
        if trained.resumed_from is not None:   # the epochs an earlier attempt trained, into this attempt's run
            for epoch, metrics in enumerate(trained.history[:trained.resumed_from[0]], start=1):
                mlflow.log_metrics(metrics, step=epoch)
        mlflow.log_metrics({"best_epoch": trained.best_epoch, "train_seconds": trained.seconds})
    return trained


def training_options(request: JobRequest, spec: ModelConfig, validated: Validated) -> dict[str, Any]:
    """Checkpoints (with what this training is: config, data, code), the preemption notice and the hopeless
    bound's gate, as train_model takes them."""
    from automation.checkpoint import CheckpointDir, Lineage
    from automation.fingerprint import code_fingerprint

    if not request.checkpoint_dir:
        return {"checkpoints": None, "notice": request.notice, "hopeless_below": spec.gates.absolute.min_accuracy}
    lineage = Lineage.of(spec.params, spec.train, validated.data_fingerprint, code_fingerprint(validated.build),
                         request.sha)
    return {"checkpoints": CheckpointDir(request.checkpoint_dir, mirror=request.checkpoint_mirror),
            "lineage": lineage, "notice": request.notice, "hopeless_below": spec.gates.absolute.min_accuracy}


def training_summary(trained: TrainResult) -> dict[str, Any]:
    return {"history": trained.history, "best_epoch": trained.best_epoch, "stopped_early": trained.stopped_early,
            "world_size": trained.world_size, "restarts": trained.restarts, "device": trained.device,
            "precision": trained.precision,
            "seconds": trained.seconds, "train_seconds": trained.train_seconds,
            "resumed_from": None if trained.resumed_from is None else
            {"epoch": trained.resumed_from[0], "step": trained.resumed_from[1]},
            "budget_reached": trained.budget_reached, "hopeless": trained.hopeless,
            "checkpoint_seconds": trained.checkpoint_seconds, "epochs_this_attempt": trained.epochs_this_attempt,
            "resumed_seconds": trained.resumed_seconds, "threads": trained.threads, "fresh_start": trained.fresh_start}


# --- an untrusted PR's two halves: export a candidate (its code), judge the candidate (the service's code) --------

def follower_node() -> int | None:
    """This node's rank when it is one of several training together and not node 0 (automation/launch.py's
    environment, set by the executor): it trains its share and leaves the job to node 0."""
    from automation.launch import Rendezvous

    rendezvous = Rendezvous.from_env()
    return rendezvous.node_rank if rendezvous.nnodes > 1 and rendezvous.node_rank > 0 else None


def share_job(request: JobRequest, spec: ModelConfig, validated: Validated, timer: StageTimer,
              progress: JobProgress) -> dict[str, Any]:
    """A follower node's job: its ranks train with node 0's; it registers, gates and reports nothing."""
    with timer.stage("train"):
        train_stage(request, spec, validated, progress)
    return {"job_id": request.job_id, "model": request.model, "node_rank": follower_node(), "trained_only": True}


def export_job(request: JobRequest, spec: ModelConfig, validated: Validated, timer: StageTimer) -> dict[str, Any]:
    """Train and write the candidate folder, with no tracking server, store or registry: the untrusted half
    records nothing anywhere. Its summary says where the folder is, and judges nothing."""
    from automation import train
    from automation.candidate import export_candidate

    splits = validated.splits
    with timer.stage("train"):
        trained = train.train_model(validated.build, spec.params, splits, spec.train, device=validated.runner,
                                    **training_options(request, spec, validated))
    with timer.stage("export candidate"):
        folder = export_candidate(trained.model, splits.input_shape, splits.x_test.dtype, splits.classes,
                                  validated.encoder, request.export_candidate)   # type: ignore[arg-type]
    return {"job_id": request.job_id, "model": request.model, "trigger": request.trigger, "sha": request.sha,
            "candidate": str(folder), "timings": dict(timer.seconds),
            "training": training_summary(trained)}


def candidate_stage(folder: Path, validated: Validated) -> Optimized:
    """The untrusted build's ONNX file, checked, as the one variant to judge. A text model's test texts are
    encoded with the candidate's own tokenizer: the network was trained on its ids."""
    from automation.candidate import read_candidate
    from automation.contract import encode_texts
    from automation.optimize import Variant
    from automation.predictors import OnnxPredictor

    splits, text = validated.splits, validated.kind == "text"
    judge = validated.spec.judge   # the base branch's: the candidate sets nothing of how it is judged
    candidate = read_candidate(folder, splits.input_shape, splits.x_test.dtype.name, splits.classes, text,
                               allow_control_flow=judge.allow_control_flow)
    if candidate.tokenizer is not None:
        validated.encoder = _candidate_tokenizer(candidate.tokenizer, splits.input_shape)
        validated.splits = encode_texts(validated.raw, validated.encoder)
    try:
        predictor = OnnxPredictor(candidate.onnx, ["CPUExecutionProvider"], CPU,
                                  call_timeout=judge.call_timeout_seconds, total_seconds=judge.total_seconds)
    except Exception as exc:
        raise StageError("load candidate", f"ONNX Runtime refused the candidate: {failure_reason('load', exc)}") \
            from None
    variant = Variant("onnx_fp32", predictor=predictor, artifact=candidate.onnx,
                      size_mb=candidate.onnx.stat().st_size / 1e6)
    return Optimized(variants=[variant], cross_device=None)


def _candidate_tokenizer(path: Path, input_shape: tuple[int, ...]) -> Any:
    """The candidate's tokenizer, taking exactly the sequence length the base branch's model takes. Its own
    `max_length` set the judge's memory (peak RSS 0.8 -> 3.3 GB at 16,384): refused, not clamped, since cutting
    it would change what the network it was trained with sees, and the candidate would no longer be itself."""
    from automation.candidate import BadCandidate
    from automation.preprocess import TextEncoder

    try:
        encoder = TextEncoder.load(path)
    except Exception as exc:   # tokenizers raises its own exception types on a malformed file
        raise BadCandidate(f"candidate tokenizer.json is not a tokenizer ({type(exc).__name__})") from None
    if (encoder.max_length,) != tuple(input_shape):
        raise BadCandidate(f"the candidate's tokenizer makes {encoder.max_length:,} tokens; the base branch's model "
                           f"takes {input_shape[0]:,}")
    return encoder


def held_out_stage(path: Path, validated: Validated) -> None:
    """The service's held-out examples in place of the test split. The test split is public: the repository's
    loader and seed rebuild it, so a candidate can be a lookup table of it (100 % there, chance elsewhere).
    Checked against the base branch's data contract, since the file is the service's and could be stale."""
    import dataclasses
    import zipfile

    raw, name = validated.raw, path.name
    try:
        with np.load(path, allow_pickle=False) as data:   # no pickles: loading must run no code
            x, y = np.asarray(data["x"]), np.asarray(data["y"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise UsageError(f"held-out set {name} is not an .npz with arrays x and y "
                         f"({type(exc).__name__})") from None
    text = validated.kind == "text"
    if text and x.dtype.kind == "U":   # strings, as the loader's raw texts (objects, which npz cannot hold unpickled)
        x = x.astype(object)
    if x.shape[1:] != raw.x_test.shape[1:] or x.dtype != raw.x_test.dtype:
        raise UsageError(f"held-out set {name}: x is {x.dtype} {list(x.shape[1:])} per example; the data contract "
                         f"says {raw.x_test.dtype} {list(raw.x_test.shape[1:])}")
    classes = len(validated.splits.classes)
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x) or not len(y) \
            or int(y.min()) < 0 or int(y.max()) >= classes:
        raise UsageError(f"held-out set {name}: y must be {len(x):,} integer labels in 0..{classes - 1}")
    y = y.astype(raw.y_test.dtype)
    validated.raw = dataclasses.replace(raw, x_test=x, y_test=y)
    # a tensor model's raw examples are its inputs; a text model's are encoded by the candidate's tokenizer
    validated.splits = dataclasses.replace(validated.splits, x_test=x, y_test=y) if not text else validated.splits
    validated.held_out = f"the service's held-out ({name}: {len(y):,} examples the build never had)"


def _judged_on(validated: Validated) -> str:
    # the report reads "on <this> test split"
    return validated.held_out or ("the base branch's public (the repository's loader and seed rebuild it, so a "
                                  "candidate can memorize it: set service.held_out_dir)")


# --- optimize: ONNX export, int8, GPU variants where available --------------------------------------------------

@dataclass
class Optimized:
    """Every configured variant, built or skipped; the benchmark stage drops failures from `variants` in place."""
    variants: list[Variant]
    cross_device: Parity | None   # GPU fp32 against CPU fp32; None on a CPU runner


def optimize_stage(config: MlgateConfig, spec: ModelConfig, validated: Validated, trained: TrainResult,
                   job_dir: Path) -> Optimized:
    """Build the variants; compiled artifacts are cached across jobs under the workdir (optimize.compile_aoti)."""
    from automation import optimize

    variants, cross_device = optimize.build_variants(trained.model, validated.splits.input_shape,
                                                     validated.splits.x_test, spec.optimize, job_dir / "variants",
                                                     validated.runner, validated.batch_sizes,
                                                     cache_dir=config.workdir / "cache")
    return Optimized(variants=variants, cross_device=cross_device)


# --- benchmark: every variant and production, same hardware, interleaved ----------------------------------------

@dataclass
class Benchmarked:
    """The variants that survived evaluation and timing, the one chosen, and production measured beside them."""
    built: list[Variant]
    chosen: Variant
    why_chosen: str
    production: dict[str, Any] | None   # _load_production's dict plus its "accuracy" and "latency"; None: none yet
    # a text model: every contender was timed on raw strings, its tokenizer inside the timed region; this is the
    # chosen variant's network alone, on token ids
    network_alone: dict[int, Any] | None = None
    not_comparable: str | None = None   # why production was not judged beside the candidate (relative gates skip)
    contract_change: dict[str, str] | None = None   # production's and the candidate's contract, when they differ


def benchmark_stage(model: str, spec: ModelConfig, validated: Validated, connected: Connected,
                    variants: list[Variant], job_dir: Path, progress: JobProgress) -> Benchmarked:
    """Evaluate every built variant, time them with production on this runner's device, and choose one.

    A variant that fails is dropped from `variants` with its reason; production whose contract differs from the
    candidate's, or that fails to load or run, is not comparable: the relative gates skip, with the reason."""
    import torch

    from automation import benchmark, optimize
    from automation.predictors import EncodingPredictor

    torch.set_num_threads(thread_policy().benchmark)   # the same count ONNX Runtime's sessions got (threads.py)

    splits, batch_sizes, encoder = validated.splits, validated.batch_sizes, validated.encoder
    production, not_comparable, changed = None, None, None
    if connected.production_version is not None:   # on this runner's device, like the candidate
        production, not_comparable, changed = _comparable_production(model, connected, validated, job_dir)
    _evaluate_variants(variants, splits)
    built = [v for v in variants if v.predictor is not None]
    # what a client sends: a text model's variants are timed with the tokenizer, as /predict runs them, and
    # production with its own tokenizer (it may have been fitted on other texts)
    inputs = validated.raw.x_test if encoder is not None else splits.x_test
    contenders = {v.name: EncodingPredictor(v.predictor, encoder) if encoder is not None else v.predictor
                  for v in built}
    if production is not None:
        contenders["production"] = production["predictor"]
    b = spec.benchmark
    total = len(batch_sizes) * b.rounds * b.iterations * len(contenders)

    def timed(who: dict[str, Any], sample: Any, advance: Any = None, caps: dict[str, float] | None = None) -> Any:
        # up to b.rounds rounds; all contenders stop together once their rounds agree
        return benchmark.measure_latency(who, sample, batch_sizes, warmup=b.warmup, iterations=b.iterations,
                                         rounds=b.rounds, min_rounds=b.min_rounds,
                                         max_round_seconds=b.max_round_seconds, min_iterations=b.min_iterations,
                                         progress=advance, caps=caps,
                                         steadiness=benchmark.Steadiness(b.steady_spread, b.steady_floor_ms))

    with progress.task("benchmark", total) as advance:
        # each variant but the reference and the probe's fastest within optimize.variant_seconds
        latency = timed(contenders, inputs, advance, optimize.time_caps(variants, spec.optimize))
    if "production" in latency.failures:   # production's own failure: the candidate is still judged
        production = None
        not_comparable = f"not comparable: production could not be run ({latency.failures['production']})"
    optimize.drop_failed(variants, latency.failures)
    built = [v for v in variants if v.predictor is not None]
    for v in built:
        v.latency = latency[v.name]
    if not built:
        raise StageError("benchmark", "no variant could be evaluated and timed: "
                         + "; ".join(f"{v.name}: {v.skipped}" for v in variants))
    if any(v.name == optimize.REFERENCE for v in variants):
        chosen, why_chosen = optimize.choose_variant(variants, spec.optimize.accuracy_tolerance,
                                                     spec.optimize.select_batch_size)
    else:   # a judged candidate: the one artifact its build handed over
        chosen, why_chosen = built[0], "the pull request's ONNX export, judged by the service's own mlgate"
    if production is not None:
        try:
            production["accuracy"] = benchmark.evaluate_accuracy(production["predictor"], inputs,
                                                                 splits.y_test, splits.classes)
            production["latency"] = latency["production"]
        except Exception as exc:   # production's own failure: the candidate is still judged
            production, not_comparable = None, f"not comparable: production {failure_reason('evaluation', exc)}"
    network_alone = None
    if encoder is not None:
        alone = timed({chosen.name: chosen.predictor}, splits.x_test)
        network_alone = None if chosen.name in alone.failures else alone[chosen.name]
    return Benchmarked(built=built, chosen=chosen, why_chosen=why_chosen, production=production,
                       network_alone=network_alone, not_comparable=not_comparable, contract_change=changed)


def _comparable_production(model: str, connected: Connected, validated: Validated,
                           job_dir: Path) -> tuple[dict[str, Any] | None, str | None, dict[str, str] | None]:
    """(production loaded, None, None), or (None, why it is not comparable, both contracts when they differ):
    production is only benchmarked on the candidate's test data when it takes the same input and classes, and a
    production that cannot be read or loaded leaves the candidate to its absolute gates."""
    from automation import gate, promote
    from automation.errors import one_line

    version, snapshot = str(connected.production_version), connected.snapshot

    def unloadable(exc: Exception) -> str:
        return f"not comparable: production could not be loaded ({one_line(f'{type(exc).__name__}: {exc}', 200)})"

    try:
        contract = promote.read_contract(snapshot.path / "MLmodel") if snapshot is not None and snapshot.path \
            else promote.version_contract(model, version, job_dir / "production-contract")
    except Exception as exc:   # a deleted or corrupt artifact
        return None, unloadable(exc), None
    changed = gate.contract_change(contract, validated.described)
    if changed is not None:
        log.warning("production not comparable", extra={"model": model, "version": version, "reason": changed})
        return None, f"not comparable: {changed}", gate.contract_sides(contract, validated.described)
    try:
        return _load_production(connected.client, model, version, job_dir, validated.runner, snapshot), None, None
    except Exception as exc:   # a deleted or corrupt artifact
        return None, unloadable(exc), None


def _evaluate_variants(variants: list[Variant], splits: Splits) -> None:
    """Each built variant's accuracy on the test split; one that cannot be evaluated is dropped, not fatal."""
    from automation import benchmark, optimize

    failures: dict[str, str] = {}
    for v in variants:
        if v.predictor is None:
            continue
        try:
            v.accuracy = benchmark.evaluate_accuracy(v.predictor, splits.x_test, splits.y_test, splits.classes)
        except Exception as exc:   # an optional variant's failure is its own
            failures[v.name] = failure_reason("evaluation", exc)
    optimize.drop_failed(variants, failures)


# --- gate -------------------------------------------------------------------------------------------------------

def gate_stage(spec: ModelConfig, benchmarked: Benchmarked) -> Verdict:
    """Judge the chosen variant against the absolute gates and production, and log the numbers judged."""
    import mlflow

    from automation import gate

    chosen, production = benchmarked.chosen, benchmarked.production
    candidate_metrics = gate.CandidateMetrics(
        accuracy=chosen.accuracy.accuracy, macro_f1=chosen.accuracy.macro_f1,
        p95_ms_batch1=chosen.latency[1].p95_ms, size_mb=chosen.size_mb, correct=chosen.accuracy.correct,
        round_p95_ms=chosen.latency[1].round_p95_ms)
    production_metrics = None if production is None else gate.CandidateMetrics(
        accuracy=production["accuracy"].accuracy, macro_f1=production["accuracy"].macro_f1,
        p95_ms_batch1=production["latency"][1].p95_ms, size_mb=production["size_mb"],
        correct=production["accuracy"].correct, round_p95_ms=production["latency"][1].round_p95_ms)
    verdict = gate.evaluate_gates(spec.gates, candidate_metrics, production_metrics, benchmarked.not_comparable,
                                  contract_changed=benchmarked.contract_change is not None)
    for check in verdict.checks:
        log.info("gate check", extra={"check": check.line(), "status": check.status})
    mlflow.log_metrics({"test_accuracy": chosen.accuracy.accuracy, "test_macro_f1": chosen.accuracy.macro_f1,
                        "p95_ms_batch1": chosen.latency[1].p95_ms, "gate_passed": float(verdict.passed)}
                       | {f"{v.name}.p50_ms_b{bs}": s.p50_ms for v in benchmarked.built for bs, s in v.latency.items()})
    return verdict


# --- register: log the torch model, its ONNX export and the chosen artifact -------------------------------------

def register_stage(request: JobRequest, client: MlflowClient, validated: Validated, trained: TrainResult,
                   variants: list[Variant], chosen: Variant, passed: bool,
                   job_dir: Path) -> tuple[str | None, dict[str, Any]]:
    """Log the models (a text model's tokenizer beside each) and the drift reference; register a version
    (tagged with the verdict) unless this job may not promote. Returns the new version (None for a PR job)
    and what the summary should say of what was logged."""
    import mlflow

    from automation import promote

    splits = validated.splits
    job_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = validated.encoder.save(job_dir / "preprocess") if validated.encoder is not None else None
    model_uri, torch_uri = _log_models(trained.model, chosen, variants, splits.x_test[:2], validated.described,
                                       [tokenizer] if tokenizer is not None else [])
    reference = job_dir / REFERENCE_FILE
    _write_reference(reference, validated, trained.model, torch_uri)
    mlflow.log_artifact(str(reference), artifact_path="reference")
    version = None
    if request.may_promote:
        with contextlib.redirect_stderr(io.StringIO()):   # MLflow prints progress chatter there
            version = str(mlflow.register_model(model_uri, request.model).version)
        client.set_model_version_tag(request.model, version, promote.GATE_TAG, "passed" if passed else "failed")
        # which device the chosen artifact was built for: an AOTInductor package runs only there
        client.set_model_version_tag(request.model, version, "mlgate.device", chosen.device)
        client.set_model_version_tag(request.model, version, "mlgate.variant", chosen.name)   # what serving loads
    return version, {"tokenizer": None if tokenizer is None else str(tokenizer)}


def served_stage(request: JobRequest, client: MlflowClient, validated: Validated, chosen: Variant, verdict: Verdict,
                 version: str, job_dir: Path) -> None:
    """Load the new version as `serve-model` will and send it the validate stage's decoded requests: a version
    that answers differently from the job's model fails the gate (a check added to `verdict`), before any
    promotion."""
    from automation import promote
    from automation.predictors import load_registered
    from automation.serving_check import served_artifact_check

    if chosen.predictor is None or not validated.served:
        return
    try:
        loaded = load_registered(client, request.model, version, job_dir / "served", validated.runner)
        check = served_artifact_check(loaded, chosen, validated.encoder, validated.described, validated.served)
    except Exception as exc:   # a version serving cannot load is a failed check, not a crashed job
        from automation.gate import Check

        check = Check("served artifact", "loads as serve-model loads it", None, "loads", "failed",
                      failure_reason("loading the registered version", exc))
    verdict.checks.append(check)
    log.info("gate check", extra={"check": check.line(), "status": check.status})
    if not check.passed:
        client.set_model_version_tag(request.model, version, promote.GATE_TAG, "failed")


REFERENCE_ROWS = 5000   # embeddings kept as a version's drift reference
MAX_CONFUSION_CLASSES = 50
MISCLASSIFIED_SHOWN = 16


def _errors(predicted: np.ndarray | None, truth: np.ndarray, classes: int) -> dict[str, Any] | None:
    """The chosen variant's confusion matrix (rows: true class, columns: predicted) and the first misclassified
    test examples (index, true, predicted), for the report."""
    if predicted is None:
        return None
    wrong = np.flatnonzero(predicted != truth)[:MISCLASSIFIED_SHOWN]
    confusion = None
    if classes <= MAX_CONFUSION_CLASSES:
        confusion = np.zeros((classes, classes), dtype=np.int64)
        np.add.at(confusion, (truth, predicted), 1)
    return {"confusion": None if confusion is None else confusion.tolist(),
            "misclassified": [[int(i), int(truth[i]), int(predicted[i])] for i in wrong]}


def _write_reference(path: Path, validated: Validated, model: Any, torch_uri: str) -> None:
    """The drift monitor's reference for this version. Numbers: the training split, raw as clients send it.
    Images and text: the model's embeddings of examples it never trained on (validation and test), and a text
    model's descriptors of those texts (triggers/drift/embeddings.py)."""
    raw = validated.raw
    if validated.kind == "tensor":
        np.savez_compressed(path, x=np.asarray(raw.x_train).reshape(len(raw.x_train), -1),
                            features=np.array(raw.features or [], dtype=str))
        return
    from automation.device import host_copy
    from automation.embeddings import embed

    unseen = np.concatenate([np.asarray(raw.x_val), np.asarray(raw.x_test)])
    if len(unseen) > REFERENCE_ROWS:
        unseen = unseen[np.sort(np.random.default_rng(0).choice(len(unseen), REFERENCE_ROWS, replace=False))]
    extra: dict[str, np.ndarray] = {}
    if validated.encoder is not None:
        # word order is measured against the training texts' pairs: unseen texts score as new windows do
        bigrams = validated.encoder.bigram_set(raw.x_train)
        extra = {f"descriptor_{name}": values
                 for name, values in validated.encoder.descriptors(list(unseen), bigrams).items()}
        extra["bigram_hashes"] = bigrams
    np.savez_compressed(path, embeddings=embed(host_copy(model), unseen, validated.encoder),
                        input_kind=np.array(validated.kind), input_shape=np.array(raw.input_shape, dtype=np.int64),
                        torch_uri=np.array(torch_uri), **extra)


# --- summary: everything the job decided, the CLI's `--json` line -----------------------------------------------

def build_summary(config: MlgateConfig, request: JobRequest, run_id: str, validated: Validated,
                  connected: Connected, trained: TrainResult | None, optimized: Optimized, benchmarked: Benchmarked,
                  verdict: Verdict, version: str | None, report_dir: Path) -> dict[str, Any]:
    """The job's summary before promotion; the promote and report stages add their outcome and timings."""
    from automation import tracking
    from automation.predictors import TIMED_REGION

    chosen, production = benchmarked.chosen, benchmarked.production
    cross_device = optimized.cross_device
    return {
        "job_id": request.job_id, "model": request.model, "version": version, "trigger": request.trigger,
        "sha": request.sha, "pr": request.pr, "run_id": run_id, "experiment_id": connected.experiment_id,
        "tracking_uri": redact_url(tracking.tracking_uri(config.workdir)),
        "data_fingerprint": validated.data_fingerprint, "environment": validated.env,
        "gate": verdict.as_dict(), "promoted": False,
        "production_before": connected.production_version, "chosen_variant": chosen.name,
        "chosen_because": benchmarked.why_chosen,
        "metrics": {"accuracy": chosen.accuracy.accuracy, "macro_f1": chosen.accuracy.macro_f1,
                    "per_class_f1": chosen.accuracy.per_class_f1, "size_mb": chosen.size_mb,
                    "latency": {str(bs): s.as_dict() for bs, s in chosen.latency.items()}},
        "production": None if production is None else {
            "version": connected.production_version, "variant": production["variant"],
            "served_as": production["served_as"], "fallback_reason": production["fallback_reason"],
            "accuracy": production["accuracy"].accuracy, "macro_f1": production["accuracy"].macro_f1,
            "size_mb": production["size_mb"],
            "latency": {str(bs): s.as_dict() for bs, s in production["latency"].items()}},
        "cross_device": None if cross_device is None else cross_device.as_dict(),
        "timed_region": TIMED_REGION,
        "variants": [v.summary() for v in optimized.variants],
        "training": None if trained is None else training_summary(trained),
        "judged": None if request.judge_candidate is None else {
            "by": "the service's own mlgate", "artifact": "ONNX (runs no code when loaded)",
            "test_split": _judged_on(validated), "gates": "the base branch's mlgate.yaml"},
        "reports": {kind: str(report_dir / f"report.{kind}") for kind in ("md", "html", "json")},
        "contract": validated.described,
        "not_comparable": benchmarked.not_comparable, "contract_change": benchmarked.contract_change,
        "errors": _errors(chosen.accuracy.predicted, validated.splits.y_test, len(validated.splits.classes)),
        "config_profile": validated.profile,
        "data_sources": {"files": len(validated.manifest),
                         "bytes": sum(int(e["size"]) for e in validated.manifest)},
        "served_path": None if benchmarked.network_alone is None else {
            "includes": "tokenizer", "latency": {str(bs): s.as_dict() for bs, s in chosen.latency.items()},
            "network_alone": {str(bs): s.as_dict() for bs, s in benchmarked.network_alone.items()}},
    }


# --- promote ----------------------------------------------------------------------------------------------------

@dataclass
class Promoted:
    """What the promote stage did: moved production (with its audit record), found it moved, or neither."""
    promoted: bool = False
    audit_id: Any = None
    stale: GateStale | None = None   # production moved since the gate compared against it: raised after reporting
    proposed: dict[str, Any] | None = None   # promotion by git: the deploy-file change recorded for the service

    def summary_fields(self) -> dict[str, Any]:
        """The summary keys this outcome sets (none when nothing was tried)."""
        if self.promoted:
            return {"promoted": True, "audit_id": self.audit_id}
        if self.proposed is not None:
            return {"proposed": self.proposed}
        if self.stale is not None:
            return {"stale": str(self.stale)}
        return {}


def promote_stage(request: JobRequest, connected: Connected, chosen: Variant, verdict: Verdict,
                  version: str | None, report_html: str, promotion: PromotionConfig | None = None) -> Promoted:
    """Tag the version with its evidence, then move production to it if the gate passed: only over the
    production the gate compared against, since a person may have moved it since."""
    from automation import promote

    client = connected.client
    if version is not None:
        client.set_model_version_tag(request.model, version, "mlgate.evidence", json.dumps(
            {"job_id": request.job_id, "trigger": request.trigger, "commit": request.sha,
             "variant": chosen.name, "report": report_html,
             "checks": [c.line() for c in verdict.checks]}, ensure_ascii=False)[:5000])
        client.set_model_version_tag(request.model, version, "mlgate.variant", chosen.name)
    if version is None or not verdict.passed:
        return Promoted()
    if promotion is not None and promotion.mode != "registry":   # git declares production: the service commits
        return propose_stage(request, connected, chosen, verdict, version, report_html, promotion)
    try:   # only over the production the gate compared against: a person may have moved it since
        record = promote.promote(client, connected.engine, request.model, version, job_id=request.job_id,
                                 reason=f"gate passed ({request.trigger} {request.sha or ''})".strip(),
                                 expected_production=connected.production_version, fence=request.fence)
    except GateStale as exc:
        return Promoted(stale=exc)
    return Promoted(promoted=True, audit_id=record.id)


def propose_stage(request: JobRequest, connected: Connected, chosen: Variant, verdict: Verdict, version: str,
                  report_html: str, promotion: PromotionConfig) -> Promoted:
    """The deploy file for the first of the model's stages, with the version's digest and this job's evidence,
    recorded as a proposal (automation/proposals.py). Production moves once git says so."""
    import tempfile

    from automation import deploy_file, proposals

    stage = promotion.stages[0]
    with tempfile.TemporaryDirectory(prefix="mlgate-digest-") as scratch:
        digest = deploy_file.version_digest(request.model, version, Path(scratch))
    declared = deploy_file.DeployFile(
        model=request.model, stage=stage, version=str(version), digest=digest, variant=chosen.name,
        evidence=deploy_file.Evidence(
            job_id=request.job_id, commit=request.sha, trigger=request.trigger, report=report_html,
            gates=[deploy_file.GateLine(name=c.name, status=c.status, line=c.line()) for c in verdict.checks]))
    proposal = proposals.propose(connected.engine, declared, job_id=request.job_id,
                                 replaces=connected.production_version if stage == "production" else None)
    return Promoted(proposed={"mode": promotion.mode, "stage": stage, "version": str(version),
                              "digest": digest, "proposal": proposal.id})


# --- report -----------------------------------------------------------------------------------------------------

def log_cost(cost: dict[str, Any]) -> None:
    import mlflow

    values = {"cost_wall_seconds": cost["wall_seconds"], "cost_cpu_seconds": cost["cpu_seconds"]}
    gpu = cost.get("gpu") or {}
    values |= {f"cost_gpu_{k}": v for k, v in gpu.items() if isinstance(v, (int, float))}
    mlflow.log_metrics(values)


def report_stage(summary: dict[str, Any], timings: dict[str, float], variants: list[Variant],
                 production: dict[str, Any] | None, report_dir: Path, test_inputs: Any = None) -> None:
    """Write the md/html/json reports, with the stage timings so far; the raw test inputs show the
    misclassified examples (thumbnails, text snippets)."""
    from automation import report

    summary["timings"] = timings
    report.write_reports(summary, variants, production, report_dir, test_inputs)


def publish_summary(summary: dict[str, Any], timings: dict[str, float], report_dir: Path) -> None:
    """Final timings (the report stage included) into report.json, and the reports onto the run."""
    import mlflow

    summary["timings"] = timings
    Path(summary["reports"]["json"]).write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    mlflow.log_artifacts(str(report_dir), artifact_path="report")


def conclude(request: JobRequest, summary: dict[str, Any], verdict: Verdict, promoted: Promoted) -> dict[str, Any]:
    """The job's outcome once the run is closed: the summary, or the reported failure raised with it."""
    if promoted.stale is not None:
        raise promoted.stale.with_summary(summary)
    if not verdict.passed:
        failed = [c.name for c in verdict.checks if c.status == "failed"]
        raise GateFailed(f"gate failed for {request.model} ({', '.join(failed)}); nothing promoted",
                         hint=f"see {summary['reports']['md']}").with_summary(summary)
    return summary


@dataclass
class CheckedData:
    splits: Splits            # what the network takes (a text model's token ids)
    raw: Splits               # what clients send (uint8 pixels, strings, numbers)
    build: Callable[..., Any]
    preprocess: Any           # the fitted step: an nn.Module inside the model, or a host-side TextEncoder
    encoder: Any              # the TextEncoder, for a text model
    described: dict[str, Any]
    served: dict[str, np.ndarray]   # a few test examples as serving decodes each kind of request for them


def model_module(config: MlgateConfig, model: str, spec: ModelConfig) -> Any:
    """The model file, its loader replaced by the data its block names (`source:`) when it names some."""
    module = check_model_module(model, spec)
    if spec.source is None:
        return module
    from automation.data_sources import with_source

    return with_source(model, module, spec.source, config.root, spec.split)


def load_checked_data(model: str, module: Any, spec: ModelConfig, fresh_data: str | None = None) -> CheckedData:
    """The model's data through its contract (automation/contract.py), fresh data appended, pre-processing
    fitted on the training split, and a build function checked on two test examples: every way a model file
    can be wrong fails here, before an MLflow run starts."""
    import torch

    from automation import contract
    from automation.predictors import host_batch

    try:
        loaded = module.load_data(**spec.data)
    except TypeError as exc:
        raise UsageError(f"models.{model}: load_data(): {exc}",
                         hint="the model's `data:` block is passed to load_data() as keyword arguments") from None
    except DataMissing as exc:
        raise UsageError(f"models.{model}: load_data(): {exc}") from None
    except FileNotFoundError as exc:   # the usual first mistake: a `data:` path relative to another folder
        raise UsageError(f"models.{model}: load_data(**{spec.data!r}): no such file: {exc.filename or exc}",
                         hint="a relative path is read from the folder mlgate runs in; check the model's `data:` "
                              "block") from None
    kind = contract.input_kind(model, module)
    raw = contract.prepare_data(model, module, loaded, spec.split)
    if fresh_data:
        raw = contract.append_fresh(raw, Path(fresh_data), getattr(module, "label", contract.DEFAULT_LABEL), kind,
                                    getattr(module, "text", contract.DEFAULT_TEXT), getattr(module, "image_mode", None))
    preprocess = contract.fit_preprocess(model, module, raw.x_train)
    encoder = preprocess if isinstance(preprocess, contract.TextEncoder) else None
    splits = contract.encode_texts(raw, encoder) if encoder is not None else raw
    build = contract.model_builder(module.build, splits, preprocess)
    try:
        probe = build(**spec.params)
    except TypeError as exc:
        raise UsageError(f"models.{model}: build(): {exc}",
                         hint="the model's `params:` block is passed to build() as keyword arguments") from None
    example = host_batch(splits.x_test[:2])
    try:
        with torch.no_grad():
            out = probe.eval()(torch.from_numpy(example))
    except Exception as exc:
        raise UsageError(f"models.{model}: build()'s network fails on two test examples shaped "
                         f"{list(example.shape)} ({example.dtype}): {type(exc).__name__}: {exc}".splitlines()[0]) from None
    if tuple(out.shape) != (2, len(splits.classes)):
        raise UsageError(f"models.{model}: build() returns {tuple(out.shape)} for 2 inputs, "
                         f"expected (2, {len(splits.classes)}) logits, one per class")
    described = contract.describe(raw, contract.preprocess_name(module), kind, splits)
    served = serving_round_trip(model, raw, described, probe, encoder)
    return CheckedData(splits, raw, build, preprocess, encoder, described, served)


def serving_round_trip(model: str, raw: Splits, described: dict[str, Any], network: Any,
                       encoder: Any) -> dict[str, np.ndarray]:
    """A few test examples sent as clients send them, decoded by serving's own decoders, then answered by the
    built network: a model serving could not feed is refused here, before training (automation/serving_check)."""
    from automation import serving_check

    signature = serving_check.Signature.of(described)
    served = serving_check.check_round_trip(model, signature, serving_check.pick_examples(raw.x_test, raw.y_test))
    for route, batch in served.items():
        logits = serving_check.answers(network, batch, encoder)
        if logits.shape != (len(batch), len(raw.classes)):
            raise UsageError(f"models.{model}: build()'s network answers {route} of {len(batch)} examples with "
                             f"{list(logits.shape)}, expected [{len(batch)}, {len(raw.classes)}]")
    return served


def _load_production(client: Any, model: str, version: str, job_dir: Path, runner: RunnerDevice,
                     snapshot: Any = None) -> dict[str, Any]:
    from automation.benchmark import size_mb
    from automation.predictors import load_registered

    loaded = snapshot.load(runner) if snapshot is not None else load_registered(client, model, version,
                                                                               job_dir / "production", runner)
    from automation.predictors import EncodingPredictor

    artifact = loaded.artifact
    predictor = loaded.predictor if loaded.encoder is None else EncodingPredictor(loaded.predictor, loaded.encoder)
    return {"variant": loaded.variant, "served_as": loaded.served_as, "fallback_reason": loaded.fallback_reason,
            "predictor": predictor, "size_mb": size_mb(artifact if artifact.is_file() else artifact / "data")}


def _log_models(model: Any, chosen: Any, variants: list[Any], example: np.ndarray,
                described: dict[str, Any], beside: list[Path] | None = None) -> tuple[str, str]:
    """Log torch + ONNX fp32 (+ the chosen artifact when it differs), each with the files `beside` it (a
    tokenizer); return the chosen model's URI and the torch model's.

    What crosses to the registry is a host copy in fp32 with a host input example, whatever
    device trained or ran it: a version must load on any machine."""
    import torch
    from mlflow.models import infer_signature

    model = host_copy(model)
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    # the AOTInductor package travels inside the torch model, which is also its portable fallback
    beside = [str(p) for p in beside or []]
    extra = [str(chosen.artifact)] if chosen.name == "torch_aoti" and chosen.artifact is not None else []
    metadata = {"mlgate": described}   # classes, feature names, pre-processing: what serving needs, in MLmodel
    with _requirements_pinned_here():
        return _log_model_files(model, chosen, variants, signature, metadata, extra, beside)


@contextlib.contextmanager
def _requirements_pinned_here() -> Iterator[None]:
    """Skip MLflow's check of a model's pip requirements against this environment: it maps every installed
    package's files to its modules first (importlib's packages_distributions, 0.4 s to 1.4 s with the dev
    extras), and the requirements mlgate logs are pinned from this very environment (`_pip_requirements`,
    and MLflow's own pin), so it can only agree. An MLflow without that hook checks, as before."""
    from mlflow.utils import environment

    original = getattr(environment, "warn_dependency_requirement_mismatches", None)
    if original is None:
        yield
        return
    environment.warn_dependency_requirement_mismatches = lambda requirements: None
    try:
        yield
    finally:
        environment.warn_dependency_requirement_mismatches = original


def _log_model_files(model: Any, chosen: Any, variants: list[Any], signature: Any, metadata: dict[str, Any],
                     extra: list[str], beside: list[str]) -> tuple[str, str]:
    """The logging itself: the torch model, the ONNX fp32 model, and the chosen artifact when it is neither."""
    import mlflow
    import onnx

    torch_info = mlflow.pytorch.log_model(model, name="torch", serialization_format="pickle", signature=signature,
                                          pip_requirements=_pip_requirements("torch"), extra_files=extra + beside or None,
                                          metadata=metadata)
    uris = {name: torch_info.model_uri for name in ("torch_eager", "torch_half", "torch_compile", "torch_aoti")}
    onnx_requirements = _pip_requirements("onnx", "onnxruntime")
    by_name = {v.name: v for v in variants}
    fp32 = by_name.get("onnx_fp32")
    if fp32 is not None and fp32.artifact is not None:
        info = mlflow.onnx.log_model(onnx.load(str(fp32.artifact)), name="onnx", signature=signature,
                                     save_as_external_data=False, pip_requirements=onnx_requirements,
                                     metadata=metadata, extra_files=beside or None)
        uris |= {"onnx_fp32": info.model_uri, "onnx_cuda": info.model_uri, "tensorrt_fp16": info.model_uri}
    if chosen.name not in uris and chosen.artifact is not None:
        info = mlflow.onnx.log_model(onnx.load(str(chosen.artifact)), name=chosen.name, signature=signature,
                                     save_as_external_data=False, pip_requirements=onnx_requirements,
                                     metadata=metadata, extra_files=beside or None)
        uris[chosen.name] = info.model_uri
    return uris[chosen.name], torch_info.model_uri
