"""A job's summary, typed: what `mlgate run --json` prints last and what the service keeps and reads back.

The summary is also a report's whole input, so it carries many more keys than these; the typed ones are
those the service acts on (the verdict, what was promoted, the cost it adds up). Anything read from outside
the service's own process goes through `JobSummary.parse`, so a forged or broken summary is refused in one
place instead of being read by string key wherever it is used.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator


def _finite(value: float | None) -> float | None:
    if value is not None and (not math.isfinite(value) or not 0 <= value < 1e12):
        raise ValueError("a cost is a finite number from 0 up")
    return value


class GateCheck(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    status: Literal["passed", "failed", "skipped"]
    line: str = ""


class GateSummary(BaseModel):
    model_config = ConfigDict(extra="allow")

    passed: bool
    checks: list[GateCheck]


class GpuCost(BaseModel):
    model_config = ConfigDict(extra="allow")

    seconds: float | None = None
    energy_joules: float | None = None

    _finite = field_validator("seconds", "energy_joules")(_finite)


class CostSummary(BaseModel):
    """What an attempt spent. A build's own figures are never taken: the service measures the sandbox."""
    model_config = ConfigDict(extra="allow")

    wall_seconds: float | None = None
    cpu_seconds: float | None = None
    gpu: GpuCost | None = None

    _finite = field_validator("wall_seconds", "cpu_seconds")(_finite)

    def totals(self) -> dict[str, float]:
        """The running totals /metrics adds this attempt to."""
        values = {"wall_seconds": self.wall_seconds, "cpu_seconds": self.cpu_seconds,
                  "gpu_seconds": self.gpu and self.gpu.seconds,
                  "gpu_energy_joules": self.gpu and self.gpu.energy_joules}
        return {name: float(value) for name, value in values.items() if value is not None}


class JobSummary(BaseModel):
    model_config = ConfigDict(extra="allow")

    job_id: str | None = None
    model: str | None = None
    version: str | None = None
    run_id: str | None = None
    sha: str | None = None
    trigger: str | None = None
    pr: int | None = None
    gate: GateSummary | None = None
    promoted: bool = False
    cost: CostSummary | None = None

    @classmethod
    def parse(cls, value: Any) -> "JobSummary | None":
        """The summary, or None when `value` is not one (not a mapping, or a typed key of the wrong shape)."""
        if not isinstance(value, dict):
            return None
        try:
            return cls.model_validate(value)
        except (ValidationError, ValueError, TypeError, RecursionError):
            return None

    @property
    def verdict(self) -> bool | None:
        """True or False when the job's gate judged; None when no gate ran."""
        return None if self.gate is None else self.gate.passed

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
