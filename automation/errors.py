"""Errors that end a job. The exit code lives on the class, as in Click."""

from __future__ import annotations

from typing import Any


def one_line(text: str, limit: int = 300) -> str:
    """The first non-blank line of a message, clipped: what a report cell or a job record can hold."""
    first = next((line.strip() for line in str(text).splitlines() if line.strip()), "")
    return first[:limit] or "unknown error"


def failure_reason(step: str, exc: BaseException, limit: int = 300) -> str:
    return one_line(f"{step} failed: {type(exc).__name__}: {exc}", limit)


class MlgateError(Exception):
    """Any failure a user should see as one line, without a traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
        self.summary: dict[str, Any] | None = None   # the job summary, when the job got that far

    def with_summary(self, summary: dict[str, Any]) -> "MlgateError":
        self.summary = summary
        return self

    def format(self) -> str:
        line = f"Error: {self}"
        return f"{line}\nHint: {self.hint}" if self.hint else line


class UsageError(MlgateError):
    """Bad command line or configuration; nothing was started."""

    exit_code = 2


class GateFailed(MlgateError):
    """The job ran, a gate failed, and nothing was promoted."""

    exit_code = 3


class GateStale(GateFailed):
    """The gate passed against a production version that is no longer production (someone moved it
    while the job ran): nothing was promoted, and the verdict must be taken again."""

    exit_code = 4


class StageError(MlgateError):
    """A stage of the job failed; the message names the stage."""

    def __init__(self, stage: str, message: str, hint: str | None = None) -> None:
        super().__init__(f"stage '{stage}' failed: {message}", hint)
        self.stage = stage
