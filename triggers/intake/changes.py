"""Which models a set of changed files touches: the rule behind push and pull-request jobs.

A model owns its model file (`models/digits_mlp.py` for `module: models.digits_mlp`), the files
named in its `paths` and `data`, and its block in `mlgate.yaml`. A change to shared code
(`service.shared_paths`, or the `defaults:` block) touches every model, and so does a change to mlgate
itself (`service.judge_paths`): the code that trains, measures and judges every model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import yaml

from automation.config import MlgateConfig, ModelConfig

CONFIG_FILE = "mlgate.yaml"


@dataclass
class Affected:
    models: list[str]
    reasons: dict[str, str] = field(default_factory=dict)   # model -> why it is affected
    note: str = ""                                           # e.g. why a fallback applied
    judge: list[str] = field(default_factory=list)           # changed files that are mlgate itself

    def reason(self) -> str:
        if not self.models:
            return self.note or "no changed file belongs to a model or to shared code"
        parts = [f"{m}: {self.reasons[m]}" for m in self.models]
        return "; ".join(parts) + (f" ({self.note})" if self.note else "")


def model_files(spec: ModelConfig) -> set[str]:
    """Repository paths that belong to one model."""
    owned = {spec.module.replace(".", "/") + ".py", *spec.paths}
    owned |= {v for v in spec.data.values() if isinstance(v, str) and ("/" in v or PurePosixPath(v).suffix)}
    return {str(PurePosixPath(p)) for p in owned}


def _under(path: str, prefix: str) -> bool:
    return path == prefix.rstrip("/") or path.startswith(prefix.rstrip("/") + "/")


def changed_config_blocks(before: str | None, after: str | None, names: Iterable[str]) -> tuple[set[str], bool]:
    """(models whose block changed, whether `defaults` or other shared keys changed)."""
    def load(text: str | None) -> dict[str, Any]:
        try:
            data = yaml.safe_load(text or "") or {}
        except yaml.YAMLError:
            return {"__unreadable__": text}
        return data if isinstance(data, dict) else {"__unreadable__": text}

    old, new = load(before), load(after)
    shared_keys = (set(old) | set(new)) - {"models"}
    shared_changed = any(old.get(k) != new.get(k) for k in shared_keys)
    old_models, new_models = old.get("models") or {}, new.get("models") or {}
    return {n for n in names if old_models.get(n) != new_models.get(n)}, shared_changed


def affected_models(config: MlgateConfig, files: Iterable[str],
                    config_versions: Callable[[], tuple[str | None, str | None]] | None = None) -> Affected:
    """Models touched by `files`. `config_versions` returns mlgate.yaml before and after the change;
    without it (or when it fails) a change to mlgate.yaml conservatively touches every model."""
    files = sorted({str(PurePosixPath(f)) for f in files})
    owned = {name: model_files(spec) for name, spec in config.models.items()}
    reasons: dict[str, str] = {}
    note, judge = "", []
    for path in files:
        owners = [name for name, paths in owned.items() if path in paths]
        for name in owners:
            reasons.setdefault(name, f"{path} changed")
        if owners:
            continue
        if path == CONFIG_FILE:
            try:
                if config_versions is None:
                    raise LookupError("the previous mlgate.yaml is not available")
                changed, shared = changed_config_blocks(*config_versions(), config.models)
            except Exception as exc:   # any API failure: retraining too much beats missing a change
                note = f"mlgate.yaml changed and could not be compared ({exc}); every model retrains"
                changed, shared = set(config.models), False
            for name in (config.models if shared else changed):
                reasons.setdefault(name, "shared settings in mlgate.yaml changed" if shared
                                   else "its block in mlgate.yaml changed")
            continue
        if any(_under(path, prefix) for prefix in config.service.judge_paths):
            judge.append(path)
            for name in config.models:
                reasons.setdefault(name, f"mlgate itself ({path}) changed")
        elif any(_under(path, prefix) for prefix in config.service.shared_paths):
            for name in config.models:
                reasons.setdefault(name, f"shared code {path} changed")
    models = [name for name in config.models if name in reasons]
    return Affected(models=models, reasons=reasons, note=note, judge=judge)
