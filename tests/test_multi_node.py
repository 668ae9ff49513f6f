"""Training across nodes, as a Kubernetes Indexed Job's pods (or Ray workers) run it: two `mlgate run`
processes, each told by the executor's environment which node it is, meet at node 0's rendezvous store and
train one model together with gloo. Node 0 evaluates, gates, registers and reports; node 1 trains its share
and reports nothing. The model is a user's own file, not one of the examples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from automation.config import load_config
from tests.conftest import JOB_THREADS, fast_config, seed_mlflow_store, write_config
from tests.test_preemption import SLOW_MODEL
from triggers.local_broker import free_port

pytestmark = pytest.mark.slow


def test_two_nodes_train_one_model_and_only_node_0_registers_it(tmp_path: Path, mlflow_template: Path) -> None:
    (tmp_path / "slow_mlp.py").write_text(SLOW_MODEL.replace("time.sleep(0.03)", "time.sleep(0.005)"))
    config = fast_config(lean=True)
    config["models"] = {"slow_mlp": {"module": "slow_mlp", "params": {"hidden": 32},
                                     "train": {"epochs": 3, "batch_size": 64, "lr": 0.01, "nodes": 2}}}
    path = write_config(tmp_path, config)
    seed_mlflow_store(load_config(path).workdir, mlflow_template)
    rendezvous = {"MLGATE_NNODES": "2", "MLGATE_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
                  "MLGATE_RDZV_ID": "two-nodes-test"}
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLGATE_", "MLFLOW_"))} | JOB_THREADS
    nodes = [subprocess.Popen([sys.executable, "-m", "triggers.cli", "--config", str(path), "run", "--model",
                               "slow_mlp", "--job-id", "multinode", "--json"], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=clean | rendezvous | {"MLGATE_NODE_RANK": str(rank)}) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for rank, (node, (out, err)) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}: {err[-3000:]}"
    leader, follower = (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)
    assert follower == {"job_id": "multinode", "model": "slow_mlp", "node_rank": 1, "trained_only": True}
    assert leader["training"]["world_size"] == 2 and leader["promoted"] is True
    from automation import tracking

    client, _ = tracking.connect(load_config(path).workdir, "mlgate")
    assert len(client.search_model_versions("name='slow_mlp'")) == 1   # one registration, by node 0
