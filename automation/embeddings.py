"""A model's embeddings: the input of its last Linear layer (the penultimate layer's output), for drift.

Comparing 784 pixel columns, or raw strings, one column at a time says little about whether the inputs a
model sees have changed; its own representation of them does. The job logs embeddings of examples the
model never trained on (validation and test) as the reference, and `mlgate monitor` embeds the current
window with the same version and compares the two (triggers/drift/monitor.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

BATCH = 64   # predictors.EVALUATION_BATCH: a text model's attention grows with the square of its length


def embedding_layer(model: nn.Module) -> nn.Linear:
    """The model's last Linear layer (its head); its input is the embedding."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise ValueError("the model has no nn.Linear layer whose input could serve as its embedding")
    return last


def embed(model: nn.Module, x: Any, encoder: Any = None, batch_size: int = BATCH) -> np.ndarray:
    """Embeddings of raw examples `x` (a text model's strings go through its `encoder` first), float32 on the
    host, in batches; the model runs in eval mode on the CPU copy it is given."""
    head = embedding_layer(model)
    captured: list[np.ndarray] = []

    def keep(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(inputs[0].detach().float().reshape(len(inputs[0]), -1).cpu().numpy())

    handle = head.register_forward_pre_hook(keep)
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                batch = x[start:start + batch_size]
                batch = encoder.encode(list(batch)) if encoder is not None else np.asarray(batch)
                model(torch.from_numpy(np.ascontiguousarray(batch)))
    finally:
        handle.remove()
    return np.concatenate(captured) if captured else np.zeros((0, head.in_features), np.float32)
