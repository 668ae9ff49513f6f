"""Parity: does an exported or compiled fp32 artifact compute what the torch model computes?

An artifact is compared with torch fp32 **on the same device and precision**: ONNX Runtime
on the CPU against torch on the CPU, a CUDA runtime against torch on that GPU. Comparing
across devices mixes in legitimate differences (TF32, cuDNN algorithm choice, fused
kernels), so the cross-device difference is reported on its own and gates nothing.

The tolerance is derived from the precision in effect, not a fixed number:

    tol = sqrt(eps(precision)) * max(1, max |reference logit|)

i.e. half the significant digits of the format, relative to the logits' scale. Two correct
runtimes reorder floating-point sums, and the error of a reordered sum grows with its
length; half the digits is a bound that such reordering stays far inside, while a wrong
graph (a dropped op, a swapped weight) misses it by orders of magnitude. For fp32 that is
3.5e-4 relative; for TF32 and fp16 3.1e-2; for bf16 8.8e-2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# machine epsilon (2^-mantissa bits) of each precision a comparison can run at
EPSILON = {"fp32": 2.0 ** -23, "tf32": 2.0 ** -10, "fp16": 2.0 ** -10, "bf16": 2.0 ** -7}


@dataclass
class Parity:
    reference: str              # what the candidate was compared with, e.g. "torch fp32 on cuda:0"
    precision: str              # the precision the tolerance was derived from
    max_abs_diff: float
    tolerance: float
    argmax_agreement: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def reason(self) -> str:
        return (f"parity with {self.reference} failed: max |Δlogit| {self.max_abs_diff:.2e} > "
                f"tolerance {self.tolerance:.2e} ({self.precision})")

    def as_dict(self) -> dict[str, object]:
        return {"reference": self.reference, "precision": self.precision, "max_abs_diff": self.max_abs_diff,
                "tolerance": self.tolerance, "argmax_agreement": self.argmax_agreement, "passed": self.passed}


def tolerance(precision: str, reference: np.ndarray) -> float:
    if precision not in EPSILON:
        raise ValueError(f"unknown precision {precision!r} (known: {', '.join(EPSILON)})")
    scale = max(1.0, float(np.abs(reference).max())) if reference.size else 1.0
    return math.sqrt(EPSILON[precision]) * scale


def compare(reference: np.ndarray, candidate: np.ndarray, *, against: str, precision: str,
            atol: float | None = None) -> Parity:
    """Compare logits; `atol` overrides the derived tolerance (optimize.parity_atol)."""
    if reference.shape != candidate.shape:
        raise ValueError(f"logits shape {candidate.shape} differs from the reference's {reference.shape}")
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    max_diff = float(diff.max()) if diff.size else 0.0
    if not np.isfinite(candidate).all():
        max_diff = math.inf
    return Parity(reference=against, precision=precision, max_abs_diff=max_diff,
                  tolerance=atol if atol is not None else tolerance(precision, reference),
                  argmax_agreement=float((reference.argmax(1) == candidate.argmax(1)).mean()))
