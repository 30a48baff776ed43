"""The run folder: model.pt, metrics.json, report.txt (+ pictures). Every file is written to a temp name
and renamed, so a kill during a save leaves the previous version intact."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

from . import PipelineError
from .fsio import atomic_write_bytes, load_weights_only


def save_torch(path: Path, obj: dict) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_torch(path: Path) -> dict:
    """torch.load with weights_only=True and nothing else: a pickle payload is refused, never run."""
    return load_weights_only(path)


def save_run(out: str | os.PathLike, model: dict, metrics: dict, report: str) -> Path:
    out = Path(out)
    save_torch(out / "model.pt", model)
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    atomic_write_bytes(out / "report.txt", report.encode())
    return out


def load_metrics(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise PipelineError(f"{run_dir} is not a run folder (no metrics.json); train one with train-head or finetune")
    return json.loads(path.read_text())


def load_model_file(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / "model.pt"
    obj = load_torch(path)
    if not isinstance(obj, dict) or "kind" not in obj or "state_dict" not in obj:
        raise PipelineError(f"{path} is not a model file of this tool")
    return obj
