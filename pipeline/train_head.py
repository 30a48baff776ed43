"""The train-head stage: cached features in, run folder out. No backbone runs here."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from . import PipelineError
from .evaluate import ci_from_accuracy, report_text, split_metrics
from .head import (HeadParams, HeadResult, TrainingDiverged, cpu_threads, cv_summary, expand_grid, head_logits,
                   params_dict, stratified_folds, train_folds, train_heads)
from .plots import PictureJob, inside, resolve_data_dir
from .runfolder import RunFolder, RunManifest
from .runtime import resolve_device
from .sidecar import Sidecar, evaluate_splits, start_pictures
from .sidecar import sidecar as start_sidecar
from .splits import cache_record

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
    folds: int = 0  # > 1: K-fold cross-validation on train+val features before the final training
    folds_seed: int = 0  # fold assignment; every setting of a sweep sees the same folds
    extra: dict = field(default_factory=dict)

    def grid(self) -> dict[str, list]:
        return {k: list(getattr(self, k)) for k in ("epochs", "lr", "momentum", "step_size", "gamma",
                                                     "batch_size", "seed")}


def _split_xy(cache, name: str):
    sp = cache.splits[name]
    return sp.features, sp.labels


SMALL_HEAD_WORK = 1 << 22  # heads x rows x dim x classes; at or below it one CPU thread is fastest


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


def pick_best(results: list[HeadResult], cv_means: list[float] | None = None) -> int:
    """Index of the head with the best val accuracy (with cross-validation: the best CV mean) among those
    that never diverged (first of equals: the grid's order); when every head diverged nothing may be saved."""
    alive = [i for i, r in enumerate(results) if r.diverged_epoch is None]
    if not alive:
        first = min(results, key=lambda r: r.diverged_epoch)
        which = "training" if len(results) == 1 else f"every one of the {len(results)} heads"
        raise TrainingDiverged(f"{which} diverged: the loss or the weights became NaN or infinite (epoch "
                               f"{first.diverged_epoch}, lr {first.params.lr:g}); nothing was saved; lower --lr")
    score = (lambda i: cv_means[i]) if cv_means is not None else (lambda i: results[i].best_val_acc)
    return max(alive, key=score)


def sweep_rows(results: list[HeadResult]) -> list[dict]:
    rows = []
    for r in results:
        row = {**params_dict(r.params), "best_val_acc": r.best_val_acc, "best_epoch": r.best_epoch}
        if r.diverged_epoch is not None:
            row["diverged_epoch"] = r.diverged_epoch
        rows.append(row)
    return rows


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


def head_model_payload(result: HeadResult, cache) -> RunManifest:
    """model.pt: everything predict needs to rebuild backbone + head from the run folder alone."""
    a = cache.attrs
    features = {"backbone": json.loads(a["backbone_spec"]), "feature_dim": int(cache.feature_dim),
                "fingerprint": a["fingerprint"], "cache": str(cache.path)}
    return RunManifest(
        kind="head", class_names=list(cache.class_names),
        state_dict={"weight": result.weight.contiguous(), "bias": result.bias.contiguous()},
        recipe=params_dict(result.params), precision=a["precision"], transform=json.loads(a["transform"]),
        decoder=a.get("decoder", "pil"), draft=bool(a.get("draft", False)), features=features,
        split=cache_record(a.get("split")))


def cross_validate(cfg: HeadConfig, cache, params: list[HeadParams], device=None) -> tuple[list[dict], float]:
    """K-fold CV of every setting on the train+val features (eval transform; the val split has no
    views, so no fold uses them). Returns one cv_summary per setting and the training seconds."""
    X = np.concatenate([cache.splits[s].features for s in ("train", cfg.val_split)])
    y = np.concatenate([cache.splits[s].labels for s in ("train", cfg.val_split)])
    if cfg.folds < 2 or len(y) < cfg.folds:
        raise PipelineError(f"--folds {cfg.folds} needs 2 <= folds <= the {len(y)} images of train+"
                            f"{cfg.val_split}")
    folds = stratified_folds(y, cfg.folds, cfg.folds_seed)
    runs, seconds = train_folds(X, y, len(cache.class_names), params, folds, device=device or resolve_device(cfg.device))
    return [{**cv_summary(r), "seed": cfg.folds_seed, "n": int(len(y)), "on": f"train+{cfg.val_split}"}
            for r in runs], seconds


def cv_line(cv: dict) -> str:
    per = " ".join(f"{a:.4f}" for a in cv["per_fold"])
    return (f"{cv['folds']}-fold CV on {cv['on']} ({cv['n']} images): mean {cv['mean']:.4f}, std {cv['std']:.4f} "
            f"(folds {per}; trained in {cv['seconds']:.3f} s)")


def run_train_head(cfg: HeadConfig, sidecar: Sidecar | None = None) -> dict:
    """Train the head(s) of cfg on its cache, write the run folder for the best one, return its metrics
    (plus report_text, and notes: pictures that could not be drawn). The run folder is locked from start to
    end and written all at once (see runfolder). sidecar: one already started (by `run`, before extract);
    by default one is started here, before torch and h5py are imported."""
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
    notes: list[str] = []
    with RunFolder(cfg.out, "head") as folder:
        run = _train(cfg, cache, params, side)
        pictures = None
        if cfg.plots:
            def pictures(into):  # drawn into the run's staging folder (the sidecar draws when there is one)
                return start_pictures(side, PictureJob(
                    str(into), run.metrics["history"], run.metrics["confusion_matrix"][cfg.val_split],
                    cache.class_names, cfg.val_split, picture_paths(cache, cfg.val_split),
                    cache.splits[cfg.val_split].labels.tolist(), run.evaluations[cfg.val_split]["pred"]))
        notes += folder.commit(head_model_payload(run.best, cache), run.metrics, run.report, pictures)
    return {**run.metrics, "report_text": run.report, "notes": notes}


@dataclass
class HeadRun:
    best: HeadResult
    metrics: dict
    report: str
    evaluations: dict


def _train(cfg: HeadConfig, cache, params: list[HeadParams], side: Sidecar | None = None) -> HeadRun:
    train = cache.splits["train"]
    views = train.views if (cfg.use_views and train.views is not None and train.views.shape[1] > 0) else None
    device = resolve_device(cfg.device)
    work = len(params) * train.features.size * len(cache.class_names)
    with cpu_threads(1 if device.type == "cpu" and work <= SMALL_HEAD_WORK else None):
        results, seconds = train_heads(_split_xy(cache, "train"), _split_xy(cache, cfg.val_split),
                                       len(cache.class_names), params, views=views, device=device)
    cvs = None
    if cfg.folds:
        cvs, cv_seconds = cross_validate(cfg, cache, params, device)
        for cv in cvs:
            cv["seconds"] = cv_seconds
    # with CV the setting is chosen by CV accuracy; its epoch is still picked on val as without
    chosen = pick_best(results, [cv["mean"] for cv in cvs] if cvs else None)
    best = results[chosen]
    eval_splits = [cfg.val_split] + [s for s in cache.splits if s not in ("train", cfg.val_split)]
    evaluations = evaluate_head(best, cache, eval_splits, side)
    metrics = {
        "kind": "head",
        "best_val_acc": best.best_val_acc,
        "best_epoch": best.best_epoch,
        "best_val_acc_ci": ci_from_accuracy(best.best_val_acc, len(cache.splits[cfg.val_split].labels)),
        "history": best.history,
        **split_metrics(evaluations),
        "class_names": cache.class_names,
        "seconds": seconds,
        "recipe": params_dict(best.params),
        "views_used": views is not None,
        "cache": str(cfg.cache),
        "n": {s: int(len(cache.splits[s].labels)) for s in cache.splits},
        "skipped": [list(s) for s in cache.skipped],
        "split": cache_record(cache.attrs.get("split")),
    }
    if cvs is not None:
        metrics["cv"] = cvs[chosen]
    if len(results) > 1:
        n_val = len(cache.splits[cfg.val_split].labels)
        metrics["sweep"] = [{**row, **({"best_val_ci": ci_from_accuracy(row["best_val_acc"], n_val)}
                                       if "diverged_epoch" not in row else {}),
                             **({"cv_mean": cv["mean"], "cv_std": cv["std"]} if cv else {})}
                            for row, cv in zip(sweep_rows(results), cvs or [None] * len(results))]
        metrics["chosen"] = chosen
    report = report_text(evaluations, best.best_val_acc, best.best_epoch)
    if cvs is not None:
        report += "\n" + cv_line(cvs[chosen]) + "\n"
    return HeadRun(best, metrics, report, evaluations)
