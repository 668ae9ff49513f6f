"""The `mlgate` command line. Heavy modules are imported inside commands so `--help` is instant.

Exit codes: 0 done (gate passed), 1 error, 2 bad usage or config, 3 gate failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import Any, NoReturn

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_GATE = 0, 1, 2, 3
REASON_HELP = "why (required); recorded in the audit trail"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlgate", description="Retrain, benchmark, optimize, gate and promote "
                                     "deep-learning models.")
    parser.add_argument("--config", help="path to mlgate.yaml (default: ./mlgate.yaml, else embedded defaults)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one whole job locally")
    run.add_argument("--model", help="model name from mlgate.yaml (default: every model)")
    run.add_argument("--trigger", choices=["manual", "push", "pr", "drift"], default="manual")
    run.add_argument("--sha", help="commit the job is for")
    run.add_argument("--pr", type=int, help="pull-request number (with --trigger pr)")
    run.add_argument("--job-id", help="job id (default: a new random id)")
    run.add_argument("--attempt", type=int, help="the queue's attempt number for --job-id: promotion is fenced "
                     "to it (refused once the attempt lost its lease); set by the service's local executor")
    run.add_argument("--extra-train", help="npz with x, y appended to the training split (drift retrain)")
    run.add_argument("--checkpoint-dir", metavar="DIR", help="resume training from the newest checkpoint here and "
                     "write new ones (default with --job-id: <workdir>/jobs/<job-id>/checkpoints). SIGTERM "
                     "checkpoints and exits 75, for the next attempt to resume")
    run.add_argument("--checkpoint-store", choices=["local", "mlflow"], default="local",
                     help="mlflow: also keep checkpoints in the MLflow artifact store, where a retry on another "
                     "runner resumes from them (needs --job-id); the GPU-runner workflow's retrain job sets it")
    run.add_argument("--earlier-attempts", metavar="COUNT,PREEMPTED,SECONDS", help=argparse.SUPPRESS)   # the service's
    run.add_argument("--json", action="store_true", help="print the JSON summary as the last stdout line")
    run.add_argument("--report-to", metavar="URL", help="post the outcome to the service that queued this job, "
                     "with a GitHub Actions OIDC token (or MLGATE_RESULT_TOKEN on a runner started by hand); a PR job "
                     "also gets production from there. "
                     "Used by the GPU-runner workflow")
    run.add_argument("--production-dir", metavar="DIR", help="compare against this production snapshot instead "
                     "of reading the registry (a PR job: written by trusted code, see automation/production.py)")
    untrusted = run.add_mutually_exclusive_group()
    untrusted.add_argument("--export-candidate", metavar="DIR", help="train only, and write the model as a candidate "
                           "folder (ONNX) for trusted code to judge: an outsider's PR, in the sandbox")
    untrusted.add_argument("--judge", metavar="DIR", help="judge a candidate folder instead of training: the "
                           "service's own mlgate, on its own test split and gates")
    run.add_argument("--held-out", metavar="FILE", help="with --judge: measure on this .npz (x, y) instead of the "
                     "test split, which is public (the repository's loader and seed make it); set by the service "
                     "from service.held_out_dir, never given to the build")
    run.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)

    check = sub.add_parser("check", help="check a model's contract in seconds, without training: its loader or "
                           "source, build(), a forward pass, the serving round trip and the ONNX export")
    check.add_argument("model", help="model name from mlgate.yaml")
    check.add_argument("--json", action="store_true", help="print the steps as JSON")
    check.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)

    for name, text in (("promote", "make a version production (manual override, audited)"),
                       ("rollback", "move production back to the previous version (audited)")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("model")
        if name == "promote":
            cmd.add_argument("version")
        else:
            cmd.add_argument("version", nargs="?", help=argparse.SUPPRESS)
        cmd.add_argument("--reason", help=REASON_HELP)   # checked by promote.py: refused in one line
        cmd.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)

    serve = sub.add_parser("serve", help="run the service: webhooks, drift intake, job queue, workers, dashboard")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)

    serve_model = sub.add_parser("serve-model", help="serve MODEL@production over HTTP (POST /predict), "
                                 "swapping versions as the alias moves")
    serve_model.add_argument("model")
    serve_model.add_argument("--host", default="127.0.0.1")
    serve_model.add_argument("--port", type=int, default=8081)
    serve_model.add_argument("--poll-seconds", type=float, default=2.0, help="how often to check the alias")
    serve_model.add_argument("--workers", type=int, default=1, help="worker processes on the one port")
    serve_model.add_argument("--max-batch", type=int, default=1024, help="examples per request, and per batch")
    serve_model.add_argument("--batch-delay-ms", type=float, default=None, metavar="MS",
                             help="dynamic batching: run concurrent requests as one batch, waiting at most MS "
                                  "for more (0: batch only what is already waiting); off by default")
    serve_model.add_argument("--stage", choices=["production", "staging"], default="production",
                             help="the alias to follow; staging: a rollout that passes there proposes the version "
                                  "for production (GitOps, promotion.stages)")
    serve_model.add_argument("--log-dir", help="inference log window (default: <workdir>/inference/MODEL)")
    serve_model.add_argument("--no-inference-log", action="store_true",
                             help="keep no inputs (privacy); `mlgate monitor` then needs --current")
    serve_model.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)

    worker = sub.add_parser("worker", help="run extra workers against the service's job queue")
    worker.add_argument("--count", type=int, default=1, help="worker threads in this process")
    worker.add_argument("--once", action="store_true", help="run at most one job per worker, then exit")
    worker.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)

    monitor = sub.add_parser("monitor", help="compute data drift against production's training data; "
                             "publish a drift event when the model's policy says so")
    monitor.add_argument("--model", required=True)
    monitor.add_argument("--current", help="file or directory of recent inputs (.npz/.parquet/.csv); default: "
                         "the serving inference log, <workdir>/inference/MODEL")
    monitor.add_argument("--data-ref", help="labelled fresh data (npz with x, y) for the retrain to add")
    monitor.add_argument("--post", metavar="URL", help="also POST the event to the service (…/events/drift)")
    monitor.add_argument("--dry-run", action="store_true", help="compute and report, publish nothing")
    monitor.add_argument("--json", action="store_true", help="print the JSON summary as the last stdout line")
    monitor.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)

    cancel = sub.add_parser("cancel", help="cancel a queued or running job (its worker stops it)")
    cancel.add_argument("job_id")
    cancel.add_argument("--reason", required=True)
    cancel.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)

    demo = sub.add_parser("demo", help="the closed loop on this machine: service, serving, drift, retrain, swap")
    demo.add_argument("--loop", action="store_true", required=True, help="run the closed-loop demo")
    demo.add_argument("--workdir", default=".mlgate-demo", help="where the demo keeps its state and logs")
    demo.add_argument("--epochs", type=int, default=15, help="training epochs per job")
    demo.add_argument("--promotion", choices=["registry", "pull_request", "commit"], default="registry",
                      help="how a passing gate promotes: the registry's alias, or a deploy file in git (a local bare "
                           "repository stands for GitHub; the demo merges the promotion branch, reverts, and moves "
                           "the alias by hand to show the reconciler)")
    demo.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)

    reconcile = sub.add_parser("reconcile", help="GitOps, once: put proposed deploy-file changes in git, then move "
                               "the registry's aliases to what the deploy files at service.branch declare")
    reconcile.add_argument("--json", action="store_true", help="print the result as one JSON line")
    reconcile.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)

    history = sub.add_parser("history", help="show the promotion audit trail")
    history.add_argument("model", nargs="?")
    history.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)

    versions = sub.add_parser("versions", help="list a model's versions: input contract, gate, which is production")
    versions.add_argument("model", help="model name from mlgate.yaml")
    versions.add_argument("--json", action="store_true", help="one JSON object per version")
    versions.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)

    retire = sub.add_parser("retire", help="take production away (audited): the next job runs with none")
    retire.add_argument("model", help="model name from mlgate.yaml")
    retire.add_argument("--reason", help=REASON_HELP)
    retire.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)
    return parser


def _load(args: argparse.Namespace) -> Any:
    from automation.config import load_config

    return load_config(getattr(args, "sub_config", None) or args.config)


def _print_human(summary: dict[str, Any]) -> None:
    if "candidate" in summary:
        print(f"{summary['model']}: candidate written to {summary['candidate']} (judged by trusted code, not here)")
        return
    verdict = "passed" if summary["gate"]["passed"] else "FAILED"
    print(f"{summary['model']}: gate {verdict}; variant {summary['chosen_variant']}; "
          f"accuracy {summary['metrics']['accuracy']:.2%}; p95 b1 {summary['metrics']['latency']['1']['p95_ms']:.3f} ms")
    for check in summary["gate"]["checks"]:
        print(f"  {check['line']}")
    if summary["promoted"]:
        print(f"  promoted version {summary['version']} to @production")
    elif summary.get("proposed"):
        proposed = summary["proposed"]
        print(f"  proposed version {proposed['version']} for {proposed['stage']} ({proposed['mode']}): the service "
              "puts the deploy file in git (`mlgate reconcile` does it once)")
    print(f"  report: {summary['reports']['html']}")


def _cmd_run(args: argparse.Namespace) -> int:
    from automation.errors import UsageError

    config = _load(args)
    names = [args.model] if args.model else list(config.models)
    for name in names:
        config.model(name)   # unknown model: fail before any work
    if args.pr is not None and args.trigger != "pr":
        raise UsageError("--pr is only meaningful with --trigger pr")
    if args.trigger == "pr" and args.pr is None:
        raise UsageError("--trigger pr needs --pr N")
    if args.report_to and (not args.job_id or len(names) != 1):
        raise UsageError("--report-to needs --job-id and --model (the job the service queued)")
    if args.attempt is not None and not args.job_id:
        raise UsageError("--attempt needs --job-id (the queued job it is an attempt of)")
    if args.production_dir and len(names) != 1:
        raise UsageError("--production-dir needs --model (a snapshot holds one model's production)")
    if (args.export_candidate or args.judge) and len(names) != 1:
        raise UsageError("--export-candidate and --judge need --model (a candidate is one model)")
    if args.held_out and not args.judge:   # the build must never be handed the examples it is measured on
        raise UsageError("--held-out needs --judge (only the judge measures on the held-out set)")
    try:
        summaries, code = _run_jobs(config, args, names)
    except Exception as exc:
        resumed_here = getattr(exc, "exit_code", 1) == 75 and os.environ.get("MLGATE_RESUMED_BY") == "platform"
        if args.report_to and not resumed_here:   # the service must learn that the job ended, whatever ended it
            _report_back(args, getattr(exc, "exit_code", 1), None,   # 75: preempted, to be resumed
                         str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    if args.report_to and not (summaries and summaries[0].get("trained_only")):   # node 0 reports the job
        _report_back(args, code, summaries[0] if summaries else None, None)
    if args.json:
        print(json.dumps(summaries[0] if len(summaries) == 1 else {"jobs": summaries}, default=str))
    return code


def _run_jobs(config: Any, args: argparse.Namespace, names: list[str]) -> tuple[list[dict[str, Any]], int]:
    from automation.checkpoint import Preempted, PreemptionNotice
    from automation.errors import GateFailed, MlgateError
    from automation.job import JobRequest, run_job
    from automation.progress import PROGRESS_FILE, JobProgress
    from triggers.github.reporter import GitHubReporter

    # an exported candidate is judged elsewhere: the untrusted half reports nothing
    reporter = None if args.export_candidate else GitHubReporter.from_env(config.reporting.tracking_issue)
    fresh_data = os.path.abspath(args.extra_train) if args.extra_train else None
    production_dir = Path(args.production_dir).resolve() if args.production_dir else None
    if production_dir is None and args.report_to and args.trigger == "pr":
        # a PR job on a runner holds no registry credential: production comes from the service, with the job's own
        from triggers.jobs.runner_results import fetch_production

        production_dir = config.workdir / "jobs" / args.job_id / "production-snapshot"
        fetch_production(args.report_to, args.job_id, production_dir)
    fence = None
    if args.attempt is not None:
        from triggers.jobs.queue import lease_fence

        fence = lease_fence(args.job_id, args.attempt)
    summaries, code = [], EXIT_OK
    checkpoints = Path(args.checkpoint_dir).resolve() if args.checkpoint_dir else \
        config.workdir / "jobs" / args.job_id / "checkpoints" if args.job_id else None
    grace = max(config.model(name).train.preemption_grace_seconds for name in names)
    record_to = config.workdir / "jobs" / args.job_id / PROGRESS_FILE if args.job_id else None
    with JobProgress(enabled=None if not args.json else False, record_to=record_to) as progress, \
            PreemptionNotice(grace, enabled=checkpoints is not None) as notice:   # else Ctrl-C is "interrupted"
        for name in names:
            request = JobRequest(model=name, trigger=args.trigger, sha=args.sha, pr=args.pr,
                                 fresh_data=fresh_data, production_dir=production_dir, fence=fence, notice=notice,
                                 earlier_attempts=_earlier_attempts(args.earlier_attempts),
                                 checkpoint_mirror=_checkpoint_mirror(config, args, name, len(names) > 1),
                                 checkpoint_dir=checkpoints / name if checkpoints and len(names) > 1 else checkpoints,
                                 export_candidate=Path(args.export_candidate).resolve() if args.export_candidate
                                 else None, judge_candidate=_taken_candidate(args.judge) if args.judge else None,
                                 held_out=Path(args.held_out).resolve() if args.held_out else None,
                                 **({"job_id": args.job_id} if args.job_id else {}))
            if reporter:
                _warn_github(reporter.started(name, args.sha))
            try:
                summary = run_job(config, request, progress)
            except GateFailed as exc:
                print(exc.format(), file=sys.stderr)
                summary, code = exc.summary or {}, exc.exit_code   # 3 gate failed, 4 production moved meanwhile
            except Preempted:
                raise   # not an end: the next attempt resumes, and reports
            except MlgateError as exc:
                if reporter:
                    _warn_github(reporter.final_status(name, args.sha, "error", str(exc)))
                raise
            finally:   # any other end: no attempt will resume from the artifact store's copies
                if request.checkpoint_mirror is not None and not notice.requested.is_set():
                    request.checkpoint_mirror.discard()
            if reporter and summary:
                summary["github"] = reporter.finished(summary)
                _warn_github(summary["github"])
            summaries.append(summary)
            if not args.json and summary:
                _print_human(summary)
    return summaries, code


def _taken_candidate(folder: str) -> Path:
    """The candidate an untrusted build left (a downloaded artifact, a volume it wrote), copied first as the
    service's executor takes one: the allowed files only, regular, bounded, no link followed at any step
    (triggers/jobs/boundary.py). The judge then reads its own copy, which the build can no longer change."""
    import tempfile

    from automation.candidate import BadCandidate
    from triggers.jobs.boundary import NoCandidate, take_candidate

    given = Path(os.path.abspath(folder))
    try:
        return take_candidate(given.parent, given.name, Path(tempfile.mkdtemp(prefix="mlgate-judge-")) / "candidate")
    except NoCandidate as exc:
        raise BadCandidate(str(exc)) from None


def _checkpoint_mirror(config: Any, args: argparse.Namespace, model: str, several: bool) -> Any:
    from automation.errors import UsageError

    if args.checkpoint_store != "mlflow":
        return None
    if not args.job_id:
        raise UsageError("--checkpoint-store mlflow needs --job-id: checkpoints are found again by the job's id")
    from automation import tracking
    from automation.checkpoint import ArtifactMirror

    client, _ = tracking.connect(config.workdir, config.experiment)
    return ArtifactMirror(client, config.experiment, f"{args.job_id}/{model}" if several else args.job_id,
                          tracking.artifact_location(config.workdir))


def _earlier_attempts(value: str | None) -> dict[str, Any] | None:
    """`COUNT,PREEMPTED,SECONDS`: what the attempts before this one spent, for the cost section."""
    from automation.errors import UsageError

    if not value:
        return None
    try:
        count, preempted, seconds = value.split(",")
        return {"count": int(count), "preempted": int(preempted), "seconds": float(seconds)}
    except ValueError:
        raise UsageError(f"--earlier-attempts is COUNT,PREEMPTED,SECONDS, not {value[:40]!r}") from None


def _warn_github(outcomes: dict[str, str]) -> None:
    for what, outcome in outcomes.items():
        if outcome.startswith("failed"):
            print(f"Warning: GitHub {what} {outcome}", file=sys.stderr)


def _report_back(args: argparse.Namespace, exit_code: int, summary: dict[str, Any] | None,
                 error: str | None) -> None:
    from triggers.jobs.runner_results import post_result

    post_result(args.report_to, args.job_id, exit_code, summary, error)


def _cmd_move(args: argparse.Namespace) -> int:
    from automation import promote, store, tracking

    promote.require_reason(args.command, args.reason)   # before any work
    config = _load(args)
    mode = config.model(args.model).promotion.mode
    if mode != "registry":
        from automation.deploy_file import deploy_path
        from automation.errors import UsageError

        path = deploy_path(config.service.gitops.folder, "production", args.model)
        raise UsageError(f"git declares {args.model}'s production (promotion.mode: {mode}); an alias moved here would "
                         "be drift, put back at the next reconcile",
                         hint=f"change {path} (or `git revert` its last change) and push")
    client, _ = tracking.connect(config.workdir, config.experiment)
    engine = store.open_store(store.database_url(config.workdir))
    if args.command == "promote":
        record = promote.promote(client, engine, args.model, args.version, reason=args.reason, manual=True)
    else:
        if args.version:
            from automation.errors import UsageError
            raise UsageError("rollback takes no version; use 'mlgate promote MODEL VERSION --reason …'")
        record = promote.rollback(client, engine, args.model, reason=args.reason)
    print(f"{args.model}: version {record.version} is now production (was {record.replaced_version or 'none'}); "
          f"audit entry {record.id}")
    return EXIT_OK


def _cmd_history(args: argparse.Namespace) -> int:
    from automation import promote, store

    config = _load(args)
    for record in promote.audit_trail(store.open_store(store.database_url(config.workdir)), args.model):
        print(json.dumps(record.as_dict()))
    return EXIT_OK


def _cmd_versions(args: argparse.Namespace) -> int:
    from automation import promote, tracking

    config = _load(args)
    config.model(args.model)
    client, _ = tracking.connect(config.workdir, config.experiment)
    rows = promote.version_rows(client, args.model)
    if not rows and not args.json:
        print(f"{args.model}: no version registered yet")
    for row in rows:
        if args.json:
            print(json.dumps(row, default=str))
            continue
        alias = f" @{row['alias']}" if row["alias"] else ""
        accuracy = "" if row["accuracy"] is None else f"; accuracy {row['accuracy']:.2%}"
        print(f"{args.model} v{row['version']}{alias}: gate {row['gate'] or '—'}{accuracy}; {row['signature']}")
    return EXIT_OK


def _cmd_retire(args: argparse.Namespace) -> int:
    from automation import promote, store, tracking

    promote.require_reason("retire", args.reason)   # before any work
    config = _load(args)
    config.model(args.model)
    client, _ = tracking.connect(config.workdir, config.experiment)
    record = promote.retire(client, store.open_store(store.database_url(config.workdir)), args.model,
                            reason=args.reason)
    print(f"{args.model}: version {record.replaced_version} retired, nothing is in production now "
          f"(`mlgate rollback` brings it back); audit entry {record.id}")
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    from triggers.service import serve

    config = _load(args)
    serve(config, _config_path(args), args.host, args.port)
    return EXIT_OK


def _cmd_serve_model(args: argparse.Namespace) -> int:
    from automation.errors import UsageError
    from triggers.serving.process import ServeSettings, serve
    from triggers.serving.server import check_rollout_labels

    # a bad config, an unknown model or a rollout that waits for labels that cannot come: one line, before
    # any worker starts
    spec = _load(args).model(args.model)
    check_rollout_labels(args.model, spec.rollout)
    if args.stage == "staging" and "staging" not in spec.promotion.stages:
        raise UsageError(f"{args.model} has no staging stage (promotion.stages: {spec.promotion.stages})")
    if args.workers < 1 or args.max_batch < 1 or (args.batch_delay_ms is not None and args.batch_delay_ms < 0):
        raise UsageError("--workers and --max-batch must be at least 1, and --batch-delay-ms at least 0")
    settings = ServeSettings(config_path=_config_path(args), model=args.model, poll_seconds=args.poll_seconds,
                             log_dir=args.log_dir, inference_log=not args.no_inference_log, max_batch=args.max_batch,
                             batch_delay_ms=args.batch_delay_ms, stage=args.stage)
    serve(settings, args.host, args.port, args.workers)
    return EXIT_OK


def _cmd_worker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from automation import store
    from triggers.github.job_reporters import job_reporter_from_env
    from triggers.jobs import queue  # noqa: F401  (its table)
    from triggers.service import make_executor
    from triggers.jobs.worker import Worker

    config = _load(args)
    engine = store.open_store(store.database_url(config.workdir))
    executor = make_executor(config, _config_path(args), engine)
    reporter = job_reporter_from_env(engine, config.workdir, config.reporting.tracking_issue)
    workers = [Worker(config, engine, executor, reporter=reporter) for _ in range(max(1, args.count))]
    if args.once:
        for worker in workers:
            worker.run_one()
        return EXIT_OK
    # the machine is going away (a spot notice, a drained node): running jobs checkpoint and are requeued
    signal.signal(signal.SIGTERM, lambda *_: [w.preempt() for w in workers])
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    try:
        while any(t.is_alive() for t in threads):
            for thread in threads:
                thread.join(0.5)
    except KeyboardInterrupt:
        for worker in workers:
            worker.stop()
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from automation.check import check_model

    config = _load(args)
    report = check_model(config, args.model)
    if args.json:
        print(json.dumps(report.as_dict()))
        return EXIT_OK
    for name, seconds in report.steps:
        print(f"  ✅ {name} ({seconds:.1f} s)")
    print(f"{args.model}: the contract holds; `mlgate run --model {args.model}` trains it")
    return EXIT_OK


def _cmd_monitor(args: argparse.Namespace) -> int:
    from pathlib import Path

    from triggers.drift.monitor import run_monitor

    config = _load(args)
    config.model(args.model)
    current = Path(args.current) if args.current else config.workdir / "inference" / args.model
    summary = run_monitor(config, args.model, current, data_ref=args.data_ref, post_url=args.post,
                          kafka_bootstrap=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), publish=not args.dry_run)
    if args.json:
        print(json.dumps(summary))
    elif not summary.get("tested", True):
        print(f"{args.model} v{summary['production_version']}: {summary['note']}")
    else:
        verdict = "drift: retrain requested" if summary["published_to"] else (
            "drift above threshold" if summary["retrain"] else "no actionable drift")
        print(f"{args.model} v{summary['production_version']}: drift share {summary['drift_share']:.2f} "
              f"({summary['drifted_columns']}/{summary['total_columns']} columns, threshold "
              f"{summary['threshold']:.2f}): {verdict}")
        moved = summary.get("drifted", [])
        if moved:   # the most drifted few; --json lists them all
            print("  moved: " + ", ".join(f"{c['column']} ({c['method']} {c['score']:.3g} vs {c['threshold']:.3g})"
                                          for c in moved[:5]) + (f", +{len(moved) - 5} more" if len(moved) > 5 else ""))
        for where in summary["published_to"]:
            print(f"  event {summary['event_id']} published to {where}")
        if summary.get("note"):
            print(f"  {summary['note']}")
        print(f"  report: {summary['report']}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from automation.logs import configure_logging
    from triggers.demo_loop import run_loop

    configure_logging(os.environ.get("MLGATE_LOG_LEVEL", "warning").upper())   # the steps are the output
    summary = run_loop(Path(args.workdir), epochs=args.epochs, promotion=args.promotion)
    print(json.dumps(summary))
    return EXIT_OK


def _cmd_reconcile(args: argparse.Namespace) -> int:
    from automation import store, tracking
    from automation.errors import UsageError
    from triggers.gitops.loop import gitops_loop

    config = _load(args)
    engine = store.open_store(store.database_url(config.workdir))
    client = tracking.connect(config.workdir, config.experiment)[0]
    loop = gitops_loop(config, engine, lambda: client)
    if loop is None:
        raise UsageError("no model's production is declared in git (promotion.mode is registry for every model)")
    published, result = loop.pass_once()
    assert result is not None
    if args.json:
        print(json.dumps({"published": published} | result.as_dict()))
        return EXIT_OK
    for line in published:
        print(line)
    for state in result.states:
        print(f"{state.model} {state.stage}: v{state.declared} {state.outcome.replace('_', ' ')}"
              + (f" ({state.detail})" if state.detail else ""))
    for line in result.refused:
        print(f"refused: {line}")
    return EXIT_OK


def _cmd_cancel(args: argparse.Namespace) -> int:
    from automation import store
    from automation.errors import MlgateError
    from triggers.jobs import queue

    config = _load(args)
    engine = store.open_store(store.database_url(config.workdir))
    if not queue.cancel(engine, args.job_id, args.reason):
        raise MlgateError(f"job {args.job_id} is unknown or already finished")
    print(f"job {args.job_id} cancelled")
    return EXIT_OK


def _config_path(args: argparse.Namespace) -> str | None:
    path = getattr(args, "sub_config", None) or args.config
    return os.path.abspath(path) if path else None


COMMANDS = {"check": _cmd_check, "demo": _cmd_demo, "serve": _cmd_serve, "serve-model": _cmd_serve_model, "worker": _cmd_worker, "monitor": _cmd_monitor, "cancel": _cmd_cancel, "run": _cmd_run, "promote": _cmd_move, "rollback": _cmd_move, "history": _cmd_history, "reconcile": _cmd_reconcile,
            "versions": _cmd_versions, "retire": _cmd_retire}


def main(argv: Sequence[str] | None = None, *, standalone: bool = True) -> int:
    """Entry point. With standalone=False it returns the exit code instead of exiting (for tests)."""
    args = _parser().parse_args(argv)
    from automation.errors import MlgateError
    from automation.logs import configure_logging

    level = os.environ.get("MLGATE_LOG_LEVEL") or ("warning" if sys.stderr.isatty() else "info")
    configure_logging(level.upper())
    try:
        code = COMMANDS[args.command](args)
    except MlgateError as exc:
        print(exc.format(), file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        code = EXIT_ERROR
    except Exception as exc:  # the last boundary: one line, traceback only on request
        if os.environ.get("MLGATE_DEBUG"):
            raise
        print(f"Error: {type(exc).__name__}: {exc} (set MLGATE_DEBUG=1 for the traceback)", file=sys.stderr)
        code = EXIT_ERROR
    if standalone:
        if args.command in QUICK_EXIT:
            exit_now(code)
        sys.exit(code)
    return code


# Commands whose process ends when they do. A job's interpreter holds some 5,000 modules (torch and its compiler,
# MLflow, ONNX); tearing them down one by one took 2.3 s after a digits job had finished.
QUICK_EXIT = {"run", "check"}


def exit_now(code: int) -> NoReturn:
    """Exit as sys.exit does, less the interpreter's teardown of every module: first what the interpreter does
    at exit, in its order (thread pools are shut down and non-daemon threads joined, then the atexit handlers
    run: logging, MLflow, multiprocessing's children, temporary files), then the streams are flushed and the
    process ends. An interpreter without those hooks exits the usual way."""
    import atexit
    import threading

    shutdown, run_exitfuncs = getattr(threading, "_shutdown", None), getattr(atexit, "_run_exitfuncs", None)
    if shutdown is None or run_exitfuncs is None:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        _flush(stream)
    shutdown()
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        _flush(stream)
    os._exit(code)


def _flush(stream: Any) -> None:
    try:
        stream.flush()
    except (OSError, ValueError):   # a closed pipe or stream: nothing more can reach it, as at a normal exit
        pass


if __name__ == "__main__":
    main()
