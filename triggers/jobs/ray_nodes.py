"""Several Ray nodes train one model: torchrun per worker. The Ray job's entrypoint (this module, on the
head) reserves one bundle per node in a placement group, asks node 0 for its address and a free port, and
runs `mlgate run` once per bundle with automation/launch.py's environment (MLGATE_NNODES, MLGATE_NODE_RANK,
MLGATE_RDZV_ENDPOINT, MLGATE_RDZV_ID). Node 0 evaluates, gates, registers and reports; the others train their
share. The entrypoint ends with node 0's exit code.

    python -m triggers.jobs.ray_nodes --nodes N --cpus C --gpus G --memory BYTES --strategy S --run-id ID \
        -- --config mlgate.yaml run ARGS…
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from typing import Any


def _address() -> tuple[str, int]:
    """This node's address and a port free on it now: node 0's rendezvous store."""
    import ray

    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def _node(rank: int, environment: dict[str, str], argv: list[str]) -> int:
    """One node's `mlgate run`, in the submission's working_dir and environment, plus its rendezvous. It gets
    SIGTERM (and checkpoints) when the Ray worker running it goes, as on a stopped submission."""
    return subprocess.run([sys.executable, "-m", "triggers.cli", *argv], env=os.environ | environment,
                          preexec_fn=_term_with_parent).returncode


def _term_with_parent() -> None:
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


def run(options: argparse.Namespace, argv: list[str]) -> int:
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init()   # the cluster this Ray job runs on
    bundle: dict[str, float] = {"CPU": options.cpus, **({"GPU": options.gpus} if options.gpus else {}),
                                **({"memory": options.memory} if options.memory else {})}
    group = placement_group([bundle] * options.nodes, strategy=options.strategy)
    ray.get(group.ready())

    def on(index: int, **resources: Any) -> dict[str, Any]:
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
                **resources}

    host, port = ray.get(ray.remote(_address).options(**on(0, num_cpus=0)).remote())
    node = ray.remote(_node)
    runs = [node.options(**on(rank, num_cpus=options.cpus, num_gpus=options.gpus,
                              memory=options.memory or None)).remote(
        rank, {"MLGATE_NNODES": str(options.nodes), "MLGATE_NODE_RANK": str(rank),
               "MLGATE_RDZV_ENDPOINT": f"{host}:{port}", "MLGATE_RDZV_ID": options.run_id}, argv)
        for rank in range(options.nodes)]
    codes = ray.get(runs)
    return int(codes[0])


def main(arguments: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ray_nodes")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--cpus", type=float, required=True)
    parser.add_argument("--gpus", type=float, default=0)
    parser.add_argument("--memory", type=int, default=0)
    parser.add_argument("--strategy", default="STRICT_SPREAD")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    options = parser.parse_args(arguments)
    argv = options.argv[1:] if options.argv[:1] == ["--"] else options.argv
    return run(options, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
