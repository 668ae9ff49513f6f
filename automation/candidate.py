"""A pull request's model as an artifact that runs no code when loaded: how untrusted code hands it over,
and how trusted code takes it.

An outsider's PR may change anything in its tree, the judge included. So its code only trains, inside a
sandbox, and writes a candidate folder: the network as one self-contained ONNX file, a text model's
tokenizer.json, and candidate.json saying what it takes. The service's own mlgate then loads that folder
and measures it on the test split and gates of the base branch (`mlgate run --judge DIR`). Nothing in the
folder is trusted: sizes, names, the ONNX graph (no external data, standard operators only) and the
input it declares are all checked before ONNX Runtime sees it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from automation.errors import MlgateError

ONNX_FILE, TOKENIZER_FILE, MANIFEST_FILE = "model.onnx", "tokenizer.json", "candidate.json"
MAX_ONNX_BYTES = 2 * 1024 ** 3      # protobuf's own limit for one file
MAX_TOKENIZER_BYTES = 64 * 1024 ** 2
MAX_MANIFEST_BYTES = 64 * 1024
# the operator sets ONNX Runtime implements itself; a custom domain would name code the judge must not load
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
# operators that repeat or branch inside one call: a candidate could loop until the job's time-out
CONTROL_FLOW = frozenset({"Loop", "Scan", "If"})


class BadCandidate(MlgateError):
    """The candidate folder is not what an untrusted build may hand over (the message says why)."""


@dataclass
class Candidate:
    onnx: Path
    tokenizer: Path | None
    input_shape: tuple[int, ...]
    dtype: str
    classes: tuple[str, ...]


def export_candidate(model: Any, input_shape: tuple[int, ...], dtype: np.dtype, classes: tuple[str, ...],
                     encoder: Any, out_dir: Path) -> Path:
    """Untrusted side: the trained network (its pre-processing inside) as ONNX, and what it takes."""
    from automation.optimize import export_onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    export_onnx(model, input_shape, out_dir / ONNX_FILE, dtype)
    if encoder is not None:
        encoder.save(out_dir)   # writes tokenizer.json
    manifest = {"input_shape": list(input_shape), "dtype": np.dtype(dtype).name, "classes": list(classes)}
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    return out_dir


def _regular_file(folder: Path, name: str, limit: int, required: bool = True) -> Path | None:
    path = folder / name
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise BadCandidate(f"candidate {name} is not a regular file")
    if not path.exists():
        if required:
            raise BadCandidate(f"the candidate has no {name}: its build did not finish")
        return None
    if path.stat().st_size > limit:
        raise BadCandidate(f"candidate {name} is {path.stat().st_size:,} bytes, over {limit:,}")
    return path


def read_candidate(folder: Path, input_shape: tuple[int, ...], dtype: str, classes: tuple[str, ...],
                   text: bool, allow_control_flow: bool = False) -> Candidate:
    """Trusted side: the candidate, checked against what the base branch's data contract says the model takes."""
    manifest_path = _regular_file(folder, MANIFEST_FILE, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))   # type: ignore[union-attr]
        declared = tuple(int(d) for d in manifest["input_shape"])
        declared_dtype, declared_classes = str(manifest["dtype"]), tuple(str(c) for c in manifest["classes"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        raise BadCandidate(f"candidate.json is not {{input_shape, dtype, classes}}: {type(exc).__name__}") from None
    if declared != tuple(input_shape) or declared_dtype != dtype:
        raise BadCandidate(f"the candidate takes {declared_dtype} {list(declared)}; the base branch's test split "
                           f"is {dtype} {list(input_shape)}")
    if declared_classes != tuple(classes):
        raise BadCandidate("the candidate names other classes than the base branch's test split")
    onnx_path = _regular_file(folder, ONNX_FILE, MAX_ONNX_BYTES)
    _check_graph(onnx_path, allow_control_flow)   # type: ignore[arg-type]
    tokenizer = _regular_file(folder, TOKENIZER_FILE, MAX_TOKENIZER_BYTES, required=text)
    return Candidate(onnx_path, tokenizer, declared, declared_dtype, declared_classes)   # type: ignore[arg-type]


def _check_graph(path: Path, allow_control_flow: bool = False) -> None:
    """One input, standard operators, every weight inside the file: external data could name any file the
    judge can read, and a custom operator domain would ask ONNX Runtime to load code."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        graph_model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:   # a malformed protobuf: onnx raises DecodeError and others
        raise BadCandidate(f"candidate model.onnx is not an ONNX model ({type(exc).__name__})") from None
    graph = graph_model.graph
    nodes, tensors = _walk(graph)   # subgraphs too: an If or Loop body is a graph of its own
    custom = sorted({o.domain for o in graph_model.opset_import} - STANDARD_DOMAINS)
    if custom or any(node.domain not in STANDARD_DOMAINS for node in nodes):
        raise BadCandidate(f"candidate model.onnx uses operator domains outside ONNX Runtime's own: {custom}")
    looping = sorted({node.op_type for node in nodes if _is_control_flow(node)})
    if looping and not allow_control_flow:
        raise BadCandidate(f"candidate model.onnx uses control flow ({', '.join(looping)}), which the base branch "
                           "does not allow (judge.allow_control_flow in its mlgate.yaml)")
    if graph_model.functions:
        raise BadCandidate("candidate model.onnx defines its own functions")
    if any(uses_external_data(t) for t in tensors):
        raise BadCandidate("candidate model.onnx keeps weights outside the file (external data)")
    weights = {t.name for t in graph.initializer}
    if len([i for i in graph.input if i.name not in weights]) != 1 or len(graph.output) < 1:
        raise BadCandidate("candidate model.onnx must take one input and give logits")


def _is_control_flow(node: Any) -> bool:
    """Loop, Scan, If, and any node that runs a graph it carries: com.microsoft's BeamSearch, GreedySearch and
    Sampling loop over their subgraphs too, up to a length the candidate's own attributes set."""
    return (node.domain in ("", "ai.onnx") and node.op_type in CONTROL_FLOW) or \
        any(a.HasField("g") or len(a.graphs) for a in node.attribute)


def _walk(graph: Any) -> tuple[list[Any], list[Any]]:
    """Every node and tensor of `graph` and of the subgraphs its nodes carry as attributes."""
    nodes, tensors = list(graph.node), list(graph.initializer)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                tensors.append(attribute.t)
            tensors.extend(attribute.tensors)
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                sub_nodes, sub_tensors = _walk(sub)
                nodes.extend(sub_nodes)
                tensors.extend(sub_tensors)
    return nodes, tensors
