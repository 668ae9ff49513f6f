"""How long one training epoch of the CPU Fashion-MNIST model takes as libgomp's waiting threads spin long
(its default), briefly (GOMP_SPINCOUNT=10000) or not at all (OMP_WAIT_POLICY=PASSIVE, what
automation/threads.py sets before torch loads). Not a test: it prints figures. Run it idle and beside busy processes:

    .venv/bin/python benchmarks/omp_wait.py
"""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import time
from automation import contract
from automation.config import SplitConfig, TrainConfig
from automation.train import train_model
from models import fashion_resnet
from models.datasets import fashion_mnist

raw = contract.prepare_data("f", fashion_resnet, fashion_mnist(train_examples=3000, test_examples=500), SplitConfig())
build = contract.model_builder(fashion_resnet.build, raw, contract.fit_preprocess("f", fashion_resnet, raw.x_train))
started = time.perf_counter()
train_model(build, {"width": 16, "blocks": 1}, raw, TrainConfig(epochs=1, batch_size=128))
print(round(time.perf_counter() - started, 1))
"""


def epoch_seconds(spin: str, policy: str) -> str:
    env = dict(os.environ, GOMP_SPINCOUNT=spin, OMP_WAIT_POLICY=policy)   # "": unset for libgomp
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


if __name__ == "__main__":
    load = os.getloadavg()[0]
    for _ in range(2):
        for spin, policy, name in (("", "", "libgomp's default"), ("10000", "", "GOMP_SPINCOUNT=10000"),
                                   ("", "PASSIVE", "OMP_WAIT_POLICY=PASSIVE")):
            print(f"{name:<24} one epoch: {epoch_seconds(spin, policy)} s  (load average {load:.1f})", flush=True)
