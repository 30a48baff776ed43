"""The train-head stage: cached features in, run folder out. No backbone runs here."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field

import numpy as np

from . import PipelineError
from .evaluate import report_text, split_metrics
from .head import HeadParams, HeadResult, expand_grid, head_logits, params_dict, train_heads
from .plots import PictureJob, inside, resolve_data_dir
from .runfolder import save_run
from .runtime import resolve_device
from .sidecar import Sidecar, evaluate_splits, start_pictures
from .sidecar import sidecar as start_sidecar

# torch (inside head's functions), h5py (cache.read_cache), scikit-learn and matplotlib (the sidecar) are
# imported only once run_train_head runs: the sidecar starts first and imports its part meanwhile.

_DEFAULTS = HeadParams()


@dataclass
class HeadConfig:
    """Each recipe field is a tuple: one value trains one head, several values sweep their grid."""

    cache: str
    out: str
    epochs: tuple[int, ...] = (_DEFAULTS.epochs,)
    lr: tuple[float, ...] = (_DEFAULTS.lr,)
    momentum: tuple[float, ...] = (_DEFAULTS.momentum,)
    step_size: tuple[int, ...] = (_DEFAULTS.step_size,)
    gamma: tuple[float, ...] = (_DEFAULTS.gamma,)
    batch_size: tuple[int, ...] = (_DEFAULTS.batch_size,)
    seed: tuple[int, ...] = (_DEFAULTS.seed,)
    device: str = "cpu"  # tiny matmuls: the CPU beats kernel-launch latency; cuda or auto work too
    use_views: bool = True  # draw augmented views when the cache has them
    plots: bool = True
    val_split: str = "val"
    extra: dict = field(default_factory=dict)

    def grid(self) -> dict[str, list]:
        return {k: list(getattr(self, k)) for k in ("epochs", "lr", "momentum", "step_size", "gamma",
                                                     "batch_size", "seed")}


def _split_xy(cache, name: str):
    sp = cache.splits[name]
    return sp.features, sp.labels


SMALL_HEAD_WORK = 1 << 22  # heads x rows x dim x classes; at or below it one CPU thread is fastest


@contextlib.contextmanager
def _threads(n: int | None):
    """torch's intra-op threads set to n for the block (None: unchanged). A small head is thousands of
    tiny matmuls: one thread is 2-5x faster than two, which wait for each other at every op and for
    the core the sidecar uses meanwhile (measured 0.14 s vs 0.63 s on the real data's cache)."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate_head(result: HeadResult, cache, splits: list[str], side: Sidecar | None = None) -> dict[str, dict]:
    preds = {}
    for s in splits:
        X, y = _split_xy(cache, s)
        pred = head_logits(result.weight, result.bias, X).argmax(1) if len(y) else np.zeros(0, np.int64)
        preds[s] = (np.asarray(y).tolist(), pred.tolist())
    out = evaluate_splits(side, preds, cache.class_names)
    for s in splits:
        out[s]["pred"] = preds[s][1]
    return out


def picture_paths(cache, split: str) -> list[str | None]:
    """Absolute path of each image of a split for predictions.png (None: not shown, as the cache's path
    leaves its data folder or the cache names no data folder). The data folder resolves even when the
    cache recorded it relative to another folder."""
    paths = cache.splits[split].paths
    try:
        recorded = json.loads(cache.attrs["config"])["data_dir"]
    except (KeyError, TypeError, ValueError):  # pictures never fail a run
        return [None] * len(paths)
    data_dir = resolve_data_dir(recorded, cache.path, paths[0] if paths else None)
    return [str(p) if (p := inside(data_dir, rel)) is not None else None for rel in paths]


def head_model_payload(result: HeadResult, cache) -> dict:
    """model.pt: everything predict needs to rebuild backbone + head from the run folder alone."""
    return {
        "kind": "head",
        "state_dict": {"weight": result.weight.contiguous(), "bias": result.bias.contiguous()},
        "class_names": cache.class_names,
        "feature_dim": cache.feature_dim,
        "recipe": params_dict(result.params),
        "backbone": json.loads(cache.attrs["backbone_spec"]),
        "cache": {"path": str(cache.path), "fingerprint": cache.attrs["fingerprint"],
                  "precision": cache.attrs["precision"], "transform": json.loads(cache.attrs["transform"]),
                  "draft": bool(cache.attrs.get("draft", False)), "decoder": cache.attrs.get("decoder", "pil")},
    }


def run_train_head(cfg: HeadConfig, sidecar: Sidecar | None = None) -> dict:
    """Train the head(s) of cfg on its cache, write the run folder for the best one, return its metrics
    (plus report_text, and notes: pictures that could not be drawn). sidecar: one already started (by
    `run`, before extract); by default one is started here, before torch and h5py are imported."""
    if sidecar is not None:
        return _run_train_head(cfg, sidecar)
    with start_sidecar(plots=cfg.plots) as side:
        return _run_train_head(cfg, side)


def _run_train_head(cfg: HeadConfig, side: Sidecar | None) -> dict:
    from cache import read_cache

    cache = read_cache(cfg.cache)
    if "train" not in cache.splits or cfg.val_split not in cache.splits:
        raise PipelineError(f"cache {cfg.cache} needs train and {cfg.val_split} splits, has {', '.join(cache.splits)}")
    for s, sp in cache.splits.items():
        if len(sp.labels) == 0:
            raise PipelineError(f"cache {cfg.cache} has no usable {s} images (all were skipped); fix the folder "
                                "and extract again")
    params = expand_grid(cfg.grid())
    train = cache.splits["train"]
    views = train.views if (cfg.use_views and train.views is not None and train.views.shape[1] > 0) else None
    device = resolve_device(cfg.device)
    work = len(params) * train.features.size * len(cache.class_names)
    with _threads(1 if device.type == "cpu" and work <= SMALL_HEAD_WORK else None):
        results, seconds = train_heads(_split_xy(cache, "train"), _split_xy(cache, cfg.val_split),
                                       len(cache.class_names), params, views=views, device=device)
    best = max(results, key=lambda r: r.best_val_acc)  # first of equals: the grid's order
    eval_splits = [cfg.val_split] + [s for s in cache.splits if s not in ("train", cfg.val_split)]
    evaluations = evaluate_head(best, cache, eval_splits, side)
    metrics = {
        "kind": "head",
        "best_val_acc": best.best_val_acc,
        "best_epoch": best.best_epoch,
        "history": best.history,
        **split_metrics(evaluations),
        "class_names": cache.class_names,
        "seconds": seconds,
        "recipe": params_dict(best.params),
        "views_used": views is not None,
        "cache": str(cfg.cache),
        "n": {s: int(len(cache.splits[s].labels)) for s in cache.splits},
        "skipped": [list(s) for s in cache.skipped],
    }
    if len(results) > 1:
        metrics["sweep"] = [{**params_dict(r.params), "best_val_acc": r.best_val_acc, "best_epoch": r.best_epoch}
                            for r in results]
    report = report_text(evaluations, best.best_val_acc, best.best_epoch)
    pictures = start_pictures(side, PictureJob(
        str(cfg.out), metrics["history"], metrics["confusion_matrix"][cfg.val_split], cache.class_names,
        cfg.val_split, picture_paths(cache, cfg.val_split), cache.splits[cfg.val_split].labels.tolist(),
        evaluations[cfg.val_split]["pred"])) if cfg.plots else list
    save_run(cfg.out, head_model_payload(best, cache), metrics, report)  # while the sidecar draws
    metrics["notes"] = pictures()
    metrics["report_text"] = report
    return metrics
