"""Checkpoints and resume inside the training loop: an interrupted run resumed from its checkpoint ends with
exactly the weights of an uninterrupted one (on the CPU, bit for bit), and only complete checkpoints are read."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from automation.checkpoint import CheckpointDir, Lineage, Preempted, PreemptionNotice
from automation.config import TrainConfig
from automation.train import TrainResult, train_model
from models import digits_mlp
from models.datasets import digits

# dropout, a onecycle schedule and several batches per epoch: every random and stateful part is exercised
CFG = TrainConfig(epochs=4, batch_size=128, lr=0.01, lr_schedule="onecycle", patience=10)
PARAMS = {"hidden": 32, "dropout": 0.2}


class Died(Exception):
    """Stands in for a SIGKILL: nothing after the raise runs, and nothing is saved on the way out."""


def _train(folder: Path | None, *, on_epoch: Any = None, notice: PreemptionNotice | None = None,
           cfg: TrainConfig = CFG, params: dict[str, Any] = PARAMS, lineage: Lineage | None = None) -> TrainResult:
    return train_model(digits_mlp.build, params, digits(seed=0), cfg, on_epoch=on_epoch, notice=notice,
                       checkpoints=CheckpointDir(folder) if folder else None, lineage=lineage)


def _die_after(epoch: int) -> Any:
    def on_epoch(ended: int, _metrics: dict[str, float]) -> None:
        if ended == epoch:
            raise Died
    return on_epoch


def _lines(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.fixture(scope="module")
def uninterrupted() -> TrainResult:
    return _train(None)


def test_a_run_killed_after_an_epoch_resumes_there_with_identical_weights(tmp_path: Path, uninterrupted: TrainResult,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    def die_after_two(epoch: int, _metrics: dict[str, float]) -> None:
        if epoch == 2:
            raise Died

    with pytest.raises(Died):
        _train(tmp_path, on_epoch=die_after_two)
    # epoch 2 ended but the process died before its checkpoint: the newest complete one is epoch 1's
    assert CheckpointDir(tmp_path).latest()["progress"]["epoch"] == 1
    trained: list[int] = []
    with caplog.at_level(logging.INFO, logger="automation.train"):
        resumed = _train(tmp_path, on_epoch=lambda epoch, _m: trained.append(epoch))
    assert resumed.resumed_from == (1, 0) and resumed.fresh_start is None
    assert _lines(caplog, "resuming") == ["resuming from the checkpoint at epoch 1, step 0"]   # one line says so
    assert trained == [2, 3, 4]                      # only the remaining epochs
    _assert_same_weights(resumed.model, uninterrupted.model)
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in uninterrupted.history]


def test_a_preemption_notice_mid_epoch_checkpoints_that_step_and_the_resume_matches(
        tmp_path: Path, uninterrupted: TrainResult) -> None:
    notice = PreemptionNotice(grace_seconds=30)
    calls = {"n": 0}

    def notice_at_step_5(module: Any, _inputs: Any) -> None:
        if not isinstance(module, torch.nn.Sequential):   # the hook sees every submodule; count the model
            return
        calls["n"] += 1
        if calls["n"] == 5:   # 1,257 rows / 128: step 5 of epoch 1 (validation calls come after the epoch)
            notice.requested.set()

    handle = torch.nn.modules.module.register_module_forward_pre_hook(notice_at_step_5)
    try:
        with pytest.raises(Preempted, match="preempted at epoch 1, step 5"):
            _train(tmp_path, notice=notice)
    finally:
        handle.remove()
    state = CheckpointDir(tmp_path).latest()
    assert state["progress"]["epoch"] == 0 and state["position"]["step"] == 5
    resumed = _train(tmp_path)
    assert resumed.resumed_from == (0, 5)
    _assert_same_weights(resumed.model, uninterrupted.model)


def test_a_torn_or_tampered_checkpoint_is_passed_over_for_the_one_before(tmp_path: Path) -> None:
    folder = CheckpointDir(tmp_path)
    folder.save({"value": torch.tensor([1.0])}, epoch=1, step=0)
    newest = folder.save({"value": torch.tensor([2.0])}, epoch=2, step=0)
    assert torch.equal(folder.latest()["value"], torch.tensor([2.0]))
    data = bytearray(newest.path.read_bytes())
    data[-20] ^= 0xFF                                    # a flipped byte: same size, other digest
    newest.path.write_bytes(bytes(data))
    assert torch.equal(folder.latest()["value"], torch.tensor([1.0]))
    newest.path.write_bytes(bytes(data[:100]))           # cut short
    assert torch.equal(folder.latest()["value"], torch.tensor([1.0]))
    (tmp_path / "ckpt-00009-0000000.pt.123.tmp").write_bytes(b"half of a write")   # a death mid-write
    (tmp_path / "ckpt-00008-0000000.pt").write_bytes(b"no sidecar: never finished")
    assert torch.equal(folder.latest()["value"], torch.tensor([1.0]))
    # a pickle that would run code is refused, even with a matching digest
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"format": 1, "run": os.system}, evil / "x.pt")
    CheckpointDir(evil).save({"fine": torch.tensor(0)}, epoch=1, step=0)
    (evil / "ckpt-00001-0000000.pt").write_bytes((evil / "x.pt").read_bytes())
    import hashlib
    import json

    data = (evil / "ckpt-00001-0000000.pt").read_bytes()
    (evil / "ckpt-00001-0000000.pt.json").write_text(json.dumps(
        {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "epoch": 1, "step": 0}))
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        CheckpointDir(evil).latest()


def test_only_the_newest_two_checkpoints_are_kept(tmp_path: Path) -> None:
    folder = CheckpointDir(tmp_path)
    for epoch in range(1, 6):
        folder.save({"epoch": epoch}, epoch=epoch, step=0)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["ckpt-00004-0000000.pt", "ckpt-00005-0000000.pt"]


def test_sigterm_sets_the_notice_and_a_missed_grace_period_exits_75(tmp_path: Path) -> None:
    import subprocess
    import sys

    def run(training: bool) -> subprocess.CompletedProcess:
        script = ("import os, signal, time\n"
                  "from automation.checkpoint import PreemptionNotice\n"
                  "with PreemptionNotice(grace_seconds=0.5) as notice:\n"
                  f"    notice.training = {training}\n"
                  "    os.kill(os.getpid(), signal.SIGTERM)\n"
                  "    assert notice.requested.wait(5)\n"
                  "    print('noticed', flush=True)\n"
                  "    time.sleep(30)   # never checkpoints: the watchdog ends it\n")
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).parents[1])

    in_training = run(True)
    assert in_training.returncode == Preempted.exit_code == 75
    assert in_training.stdout.strip() == "noticed"
    assert "no checkpoint within the 0.5 s grace period" in in_training.stderr
    outside = run(False)   # nothing to checkpoint: it goes at once, without waiting out the grace period
    assert outside.returncode == 75 and outside.stdout == ""
    assert "preempted outside training" in outside.stderr
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # this process's handler was never touched


def test_max_minutes_stops_with_the_best_weights_so_far() -> None:
    budget = TrainConfig(epochs=50, batch_size=64, lr=3e-3, max_minutes=0.0001, patience=50)
    result = _train(None, cfg=budget)
    assert result.budget_reached and len(result.history) == 1 and result.history[-1]["partial"] == 1.0
    assert result.best_epoch == 1


def test_abort_when_hopeless_stops_a_run_that_cannot_reach_the_gate() -> None:
    hopeless = TrainConfig(epochs=30, batch_size=128, lr=1e-5, abort_when_hopeless=True, patience=30)
    result = train_model(digits_mlp.build, PARAMS, digits(seed=0), hopeless, hopeless_below=0.99)
    assert result.hopeless is not None and "under the 99.00% gate" in result.hopeless
    assert len(result.history) == 3
    reachable = train_model(digits_mlp.build, PARAMS, digits(seed=0), CFG.model_copy(
        update={"abort_when_hopeless": True}), hopeless_below=0.5)
    assert reachable.hopeless is None and len(reachable.history) == CFG.epochs


def test_a_retry_on_a_fresh_workspace_resumes_from_the_artifact_store(tmp_path: Path, mlflow_template: Path,
                                                                      uninterrupted: TrainResult) -> None:
    """The `github` executor's retry runs on another runner: its workspace is empty, and the checkpoints come
    from the MLflow artifact store (a real one: the SQLite store and its artifact folder)."""
    from automation import tracking
    from automation.checkpoint import ArtifactMirror
    from tests.conftest import seed_mlflow_store

    seed_mlflow_store(tmp_path / "store", mlflow_template)
    client, _ = tracking.connect(tmp_path / "store", "mlgate")

    def die_after_three(epoch: int, _metrics: dict[str, float]) -> None:
        if epoch == 3:
            raise Died

    location = (tmp_path / "store" / "mlartifacts").as_uri()
    first_runner = CheckpointDir(tmp_path / "runner-1", mirror=ArtifactMirror(client, "mlgate", "job'1", location))
    with pytest.raises(Died):
        train_model(digits_mlp.build, PARAMS, digits(seed=0), CFG, on_epoch=die_after_three, checkpoints=first_runner)
    # a torn upload: a checkpoint whose sidecar never arrived is not fetched
    torn = tmp_path / "ckpt-00009-0000000.pt"
    torn.write_bytes(b"the upload of a runner that died mid-way")
    mirror = ArtifactMirror(client, "mlgate", "job'1")
    client.log_artifact(mirror._run(create=False), str(torn), artifact_path="checkpoints")
    # another job's checkpoints are not this one's
    CheckpointDir(tmp_path / "other", mirror=ArtifactMirror(client, "mlgate", "job2")).save(
        {"not": torch.tensor(1)}, epoch=7, step=0)

    second_runner = tmp_path / "runner-2"
    resumed = train_model(digits_mlp.build, PARAMS, digits(seed=0), CFG,
                          checkpoints=CheckpointDir(second_runner, mirror=mirror))
    assert resumed.resumed_from == (2, 0)
    _assert_same_weights(resumed.model, uninterrupted.model)
    assert not (second_runner / "ckpt-00009-0000000.pt").exists()
    CheckpointDir(second_runner, mirror=mirror).clear("the job succeeded")   # the job ended: both copies go
    assert not second_runner.exists()
    assert ArtifactMirror(client, "mlgate", "job'1")._run(create=False) is None
    mirror.discard()   # again (the CLI discards too, on its way out): nothing to do, no error
    assert ArtifactMirror(client, "mlgate", "job2")._run(create=False) is not None


def test_a_resume_under_another_lr_starts_fresh_and_says_why(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A changed lr once resumed a finished job's checkpoint: 0 epochs trained, the old weights registered
    under the new lr. A checkpoint records what wrote it; another config trains from scratch."""
    with pytest.raises(Died):
        _train(tmp_path, on_epoch=_die_after(3))
    changed = CFG.model_copy(update={"lr": 0.02})
    trained: list[int] = []
    with caplog.at_level(logging.INFO, logger="automation.train"):
        result = _train(tmp_path, cfg=changed, on_epoch=lambda epoch, _m: trained.append(epoch))
    assert trained == [1, 2, 3, 4] and result.resumed_from is None
    expected = "checkpoint from epoch 2, step 0 was written by another config (lr 0.01 -> 0.02); starting fresh"
    assert _lines(caplog, "starting fresh") == [expected] and result.fresh_start == expected
    assert not _lines(caplog, "resuming")
    _assert_same_weights(result.model, _train(None, cfg=changed).model)   # as if no checkpoint had been there
    # the other config's checkpoints went with it (by epoch they would outrank the fresh run's)
    state = CheckpointDir(tmp_path).latest()
    assert state["progress"]["epoch"] == 4 and json.loads(state["lineage"]["config"])["train.lr"] == 0.02


def test_what_differs_is_named_and_settings_of_the_run_alone_still_resume() -> None:
    base = Lineage.of(PARAMS, CFG, data="d1", code="c1", commit="a" * 40)
    recorded = base.record()
    assert base.differences(recorded) == []
    # more time, another checkpoint interval, loader workers, threads: how it runs, not what it computes
    how = CFG.model_copy(update={"max_minutes": 30.0, "checkpoint_every_minutes": 1.0, "loader_workers": 2,
                                 "threads": 1, "distributed": "off", "abort_when_hopeless": True})
    assert Lineage.of(PARAMS, how, "d1", "c1", "a" * 40).differences(recorded) == []
    other = Lineage.of({**PARAMS, "hidden": 64}, CFG.model_copy(update={"epochs": 8}), "d2", "c2")
    assert other.differences(recorded) == ["another config (hidden 32 -> 64, epochs 4 -> 8)", "other data",
                                           "other code (the model file changed)"]
    assert Lineage.of(PARAMS, CFG, "d1", "c1", "b" * 40).differences(recorded) == \
        ["other code (commit aaaaaaaaaaaa -> bbbbbbbbbbbb)"]
    assert base.differences(None) == ["an mlgate that recorded no config, data or code"]


def test_weights_that_do_not_fit_the_network_start_fresh_before_anything_is_loaded(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Code the model file's hash cannot see (a module it imports) can change the network under the same
    lineage: the checkpoint's shapes are checked first, and the run starts fresh."""
    same = Lineage.of(PARAMS, CFG, data="d", code="c")
    with pytest.raises(Died):
        _train(tmp_path, on_epoch=_die_after(2), lineage=same)
    wider = {**PARAMS, "hidden": 48}
    with caplog.at_level(logging.INFO, logger="automation.train"):
        result = _train(tmp_path, params=wider, lineage=same)
    assert result.resumed_from is None and len(result.history) == CFG.epochs
    assert _lines(caplog, "starting fresh") == [
        "checkpoint from epoch 1, step 0 was written by a network of another shape (1.weight: [32, 64] -> "
        "[48, 64]); starting fresh"]
    _assert_same_weights(result.model, _train(None, params=wider).model)


def test_a_job_that_ends_deletes_its_checkpoints_and_a_preempted_one_keeps_them(tmp_path: Path) -> None:
    from automation.errors import GateFailed
    from automation.job import JobRequest, end_checkpoints

    def request_with_a_checkpoint(name: str) -> JobRequest:
        CheckpointDir(tmp_path / name).save({"w": torch.tensor(1.0)}, epoch=1, step=0)
        return JobRequest(model="digits_mlp", checkpoint_dir=tmp_path / name)

    for name, error in (("succeeded", None), ("gate", GateFailed("gate failed")), ("error", RuntimeError("x"))):
        end_checkpoints(request_with_a_checkpoint(name), error)
        assert not (tmp_path / name).exists(), name
    preempted = request_with_a_checkpoint("preempted")
    end_checkpoints(preempted, Preempted("preempted at epoch 2, step 3"))
    assert CheckpointDir(tmp_path / "preempted").latest() is not None
    noticed = request_with_a_checkpoint("noticed")   # the notice came; whatever ended the process, it resumes
    noticed.notice = PreemptionNotice(grace_seconds=1)
    noticed.notice.requested.set()
    end_checkpoints(noticed, RuntimeError("broken pipe on the way out"))
    assert CheckpointDir(tmp_path / "noticed").latest() is not None


def test_the_job_records_the_lineage_a_direct_training_does(tmp_path: Path) -> None:
    """A first attempt trained by train_model() itself (as the workflow test leaves one) and the job's retry
    agree on what wrote the checkpoint: the job's builder wraps the model file's build() in mlgate's own code,
    which the code fingerprint leaves out."""
    from automation.config import load_config
    from automation.job import JobRequest, training_options, validate
    from automation.train import default_lineage

    config = load_config(Path(__file__).parents[1] / "mlgate.yaml")
    spec = config.model("digits_mlp")
    validated = validate(config, JobRequest(model="digits_mlp"), spec)
    job = training_options(JobRequest(model="digits_mlp", checkpoint_dir=tmp_path, sha="c" * 40), spec,
                           validated)["lineage"]
    direct = default_lineage(digits_mlp.build, spec.params, digits_mlp.load_data(**spec.data), spec.train)
    assert job.differences(direct.record()) == []
