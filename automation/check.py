"""`mlgate check MODEL`: the model contract, checked in seconds, with no training and no registry.

Runs what a job runs before and after training on a handful of examples: the loader (or the yaml `source:`),
the contract's conversions, the pre-processing fit, build() and a forward pass, the serving round trip (the
loader's examples as clients send them, decoded by serving's own decoders, into the network), and the ONNX
export answering those requests as torch does. Each step is a line; the first failure is one line, as in a
job. (scikit-learn's `check_estimator` is the model: what a framework promises, checked on the user's code.)
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from automation.config import MlgateConfig
from automation.errors import UsageError, failure_reason


@dataclass
class CheckReport:
    model: str
    steps: list[tuple[str, float]] = field(default_factory=list)   # what passed, and how long it took

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.steps.append((name, time.perf_counter() - started))

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "passed": True,
                "steps": [{"step": name, "seconds": round(seconds, 3)} for name, seconds in self.steps]}


def check_model(config: MlgateConfig, model: str, on_step: Callable[[str, float], None] | None = None) -> CheckReport:
    """Every step on the CPU with the model's CPU profile (`on_cpu`), as a CPU runner would run it; raises a
    UsageError (one line) at the first step that fails."""
    from automation.device import CPU
    from automation.job import load_checked_data, model_module

    spec = config.model(model)
    spec = spec.for_cpu() if spec.on_cpu else spec
    report = CheckReport(model)
    with report.step("model file: build() and the data's loader"):
        module = model_module(config, model, spec)
    with report.step("data: the contract, pre-processing, build() and a forward pass, the serving round trip"):
        checked = load_checked_data(model, module, spec)
    with report.step(f"export: ONNX answers {len(checked.served)} kinds of request as torch does"):
        _check_export(model, checked, spec.params, CPU)
    if on_step is not None:
        for name, seconds in report.steps:
            on_step(name, seconds)
    return report


def _check_export(model: str, checked: Any, params: dict[str, Any], device: Any) -> None:
    """The untrained network exported to ONNX and run by ONNX Runtime on the decoded requests, against torch:
    a network torch.export cannot trace, or whose export computes something else, is found before training."""
    from automation import parity
    from automation.optimize import export_onnx
    from automation.predictors import OnnxPredictor, host_batch, predict
    from automation.serving_check import answers

    network = checked.build(**params).eval()
    sample = host_batch(checked.splits.x_test[:1])
    with tempfile.TemporaryDirectory(prefix="mlgate-check-") as folder:
        path = Path(folder) / "model.onnx"
        try:
            export_onnx(network, checked.splits.input_shape, path, sample.dtype)
            predictor = OnnxPredictor(path, device=device)
        except Exception as exc:
            raise UsageError(f"models.{model}: build()'s network: "
                             f"{failure_reason('ONNX export', exc)} (it must be traceable by torch.export)") from None
        for route, batch in checked.served.items():
            expected = answers(network, batch, checked.encoder)
            x = checked.encoder.encode(list(batch)) if checked.encoder is not None else np.asarray(batch)
            result = parity.compare(expected, predict(predictor, x), against="torch fp32", precision="fp32")
            if not result.passed:
                raise UsageError(f"models.{model}: the ONNX export answers {route} differently from torch: "
                                 f"{result.reason()}")
