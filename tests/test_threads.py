"""The thread policy (automation/threads.py): the CPUs a process may use, not the host's, decide every count."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from automation.threads import MAX_DERIVED_THREADS, ort_session_options, policy, quota_cpus, usable_cpus

PROBE = ("import json; from automation.threads import policy; import onnxruntime as ort; "
         "from automation.threads import ort_session_options; o = ort_session_options(ort.SessionOptions(), None); "
         "print(json.dumps(policy().describe() | {'ort_intra': o.intra_op_num_threads, 'ort_inter': "
         "o.inter_op_num_threads}))")


def probe(*prefix: str, env: dict[str, str] | None = None) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    done = subprocess.run([*prefix, sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                          env=clean | (env or {}))
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_a_process_pinned_to_one_core_gets_one_thread_everywhere() -> None:
    pinned = probe("taskset", "-c", "0")
    assert pinned["cpus"] == 1 and pinned["train"] == pinned["benchmark"] == pinned["serve_workers"] == 1
    assert pinned["ort_intra"] == 1 and pinned["ort_inter"] == 1 and pinned["serve_intra_op"] == 1
    assert pinned["omp_wait_policy"] == "PASSIVE"   # set by importing automation, before torch loads


def test_the_runners_share_and_its_own_wait_policy_stand() -> None:
    shared = probe(env={"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"})
    assert shared["train"] == shared["benchmark"] == shared["ort_intra"] == 1
    assert shared["omp_wait_policy"] == "ACTIVE"
    assert shared["cpus"] == usable_cpus()   # the share sets threads, not what the process may use


@pytest.mark.parametrize("files,expected", [
    ({"cpu.max": "150000 100000\n"}, 1.5),                                     # cgroup v2, 1.5 CPUs
    ({"cpu.max": "max 100000\n"}, None),                                        # v2, no quota
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),   # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),     # v1, no quota
    ({"cpu.max": "garbage\n"}, None),
    ({}, None),
])
def test_the_cgroup_quota_is_read_from_either_hierarchy(tmp_path: Path, files: dict[str, str],
                                                        expected: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert quota_cpus(tmp_path) == expected


def test_a_quota_below_the_affinity_lowers_every_count(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("50000 100000\n")   # half a CPU: one thread, however many cores show
    limited = policy(root=tmp_path)
    assert usable_cpus(tmp_path) == 1 and limited.cpus == 1 and limited.serve_workers == 1
    assert limited.train == (int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit()
                             else 1)
    assert policy(train_threads=3, root=tmp_path).train == 3   # train.threads is the model's own choice
    assert policy(root=tmp_path / "none").serve_workers == min(MAX_DERIVED_THREADS, usable_cpus())


def test_onnx_runtime_sessions_get_the_policys_threads() -> None:
    import onnxruntime as ort

    options = ort_session_options(ort.SessionOptions(), 1)
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
