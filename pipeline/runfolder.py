"""The run folder: model.pt, metrics.json, report.txt (+ pictures). Every file is written to a temp name
and renamed, so a kill during a save leaves the previous version intact."""
from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import torch

from . import PipelineError


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_torch(path: Path, obj: dict) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def load_torch(path: Path) -> dict:
    """torch.load with weights_only=True and nothing else: a pickle payload is refused, never run."""
    if not path.is_file():
        raise PipelineError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise PipelineError(f"refused {path}: it holds pickled objects that weights_only loading will not run "
                            f"({first[:160]})") from None
    except Exception as e:
        raise PipelineError(f"cannot read {path}: {type(e).__name__}: {str(e)[:160]}") from None


def save_run(out: str | os.PathLike, model: dict, metrics: dict, report: str) -> Path:
    out = Path(out)
    save_torch(out / "model.pt", model)
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    atomic_write(out / "report.txt", report.encode())
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
