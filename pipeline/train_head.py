"""The train-head stage: cached features in, run folder out. No backbone runs here."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import PipelineError
from .metrics import (balanced_accuracy, ci_from_accuracy, classification_metrics, confusion_record,
                      format_accuracy, run_metrics, run_report_text)
from .head import (HeadParams, HeadResult, TrainingDiverged, class_weights, cpu_threads, expand_grid, head_logits,
                   params_dict, train_folds, train_heads, train_probes)
from .folds import copies_line, copies_record, grouped_folds, split_copy_groups
from .recipe import RECIPE_FIELDS, AUTO_CV_MAX_ROWS, AUTO_TUTORIAL_MAX_ROWS, ProbeParams, auto_folds, auto_grid, scaled_to
from .plots import PictureJob, data_folder, draw_pictures, inside
from .runfolder import RunFolder, RunManifest
from .runtime import resolve_device
from .splits import cache_record
from .calibration import calibrate_head, softmax
from .learning_curve import learning_curve, table as learning_curve_table
from .novelty import run_novelty

# torch (inside head's functions), h5py (cache.read_cache) and matplotlib (plots, when drawing) are imported
# only once run_train_head runs.

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
    folds: int = 0  # > 1: K-fold cross-validation on the train split chooses among the settings
    folds_seed: int = 0  # fold assignment; every setting of a sweep sees the same folds
    recipe: str = "tutorial"  # tutorial: the seed recipe (flags above); auto: chosen by CV on train (the CLI's default)
    class_weight: str | None = None  # "balanced": each class's rows weigh n / (classes * count)
    learning_curve: bool = False  # also train the kept recipe on growing shares of train (learning_curve.py)
    extra: dict = field(default_factory=dict)

    def grid(self) -> dict[str, list]:
        return {k: list(getattr(self, k)) for k in RECIPE_FIELDS}


def _split_xy(cache, name: str):
    sp = cache.splits[name]
    return sp.features, sp.labels


SMALL_HEAD_WORK = 1 << 22  # heads x rows x dim x classes; at or below it one CPU thread is fastest


def head_classification_metrics(result: HeadResult, cache, splits: list[str]) -> dict[str, dict]:
    """{split: classification_metrics(...) of the head's predictions, plus 'pred'}: the kept head on each split."""
    out = {}
    for s in splits:
        X, y = _split_xy(cache, s)
        pred = head_logits(result.weight, result.bias, X).argmax(1) if len(y) else np.zeros(0, np.int64)
        out[s] = {**classification_metrics(y, pred, cache.class_names), "pred": pred.tolist()}
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


def sweep_rows(results: list[HeadResult], last: bool = False) -> list[dict]:
    """One row per setting: its recipe and the val accuracy and epoch of the head kept for it: the best val
    epoch, or with last (cross-validation chose: the last epoch is kept) the last epoch's."""
    rows = []
    for r in results:
        acc, epoch = ((r.history[-1]["val_acc"], len(r.history) - 1) if last and r.history
                      else (r.best_val_acc, r.best_epoch))
        row = {**params_dict(r.params), "best_val_acc": acc, "best_epoch": epoch}
        if r.diverged_epoch is not None:
            row["diverged_epoch"] = r.diverged_epoch
        rows.append(row)
    return rows


def picture_paths(cache, split: str) -> list[str | None]:
    """Absolute path of each image of a split for predictions.png (None: not shown, as the cache's path
    leaves its data folder or the cache names no data folder). The data folder resolves even when the
    cache recorded it relative to another folder."""
    paths = cache.splits[split].paths
    data_dir, _ = data_folder(cache)
    if data_dir is None:  # pictures never fail a run: predictions.png says "image not found"
        return [None] * len(paths)
    return [str(p) if (p := inside(data_dir, rel)) is not None else None for rel in paths]


def head_model_payload(result: HeadResult, cache) -> RunManifest:
    """model.pt: everything predict needs to rebuild backbone + head from the run folder alone."""
    a = cache.meta
    features = {"backbone": a.backbone_spec, "feature_dim": a.feature_dim, "fingerprint": a.fingerprint,
                "cache": str(cache.path)}
    return RunManifest(
        kind="head", class_names=list(a.class_names),
        state_dict={"weight": result.weight.contiguous(), "bias": result.bias.contiguous()},
        recipe=params_dict(result.params), precision=a.precision, transform=a.transform, decoder=a.decoder,
        draft=a.draft, features=features, split=a.split or cache_record(None))  # None: made before flat folders


NOVELTY_FOLDS = 10  # out-of-fold train scores set the novelty threshold (copies in one fold)
IMBALANCE = 1.5  # train classes this uneven (largest / smallest) choose by balanced accuracy


def is_imbalanced(labels, classes: int) -> bool:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=classes)
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() >= IMBALANCE * counts.min()


def fold_score(y_true, y_pred, classes: int, metric: str) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if metric == "accuracy":
        return float((y_true == y_pred).mean()) if len(y_true) else 0.0
    return balanced_accuracy(confusion_record(y_true, y_pred, classes, dense_limit=0))  # no C x C array


def recipe_name(p) -> str:
    if isinstance(p, ProbeParams):
        return p.name()
    return (f"tutorial SGD lr {p.lr:g}, {p.epochs} epochs, batch {p.batch_size}, momentum {p.momentum:g}, "
            f"StepLR {p.step_size}/{p.gamma:g}")


@dataclass
class Selection:
    """How the recipe was chosen: the candidates' cross-validation on train (val never seen)."""

    metric: str  # accuracy or balanced_accuracy
    folds: int
    n: int
    candidates: list
    scores: list[list[float] | None]  # per candidate its per-fold scores (None: diverged)
    chosen: int
    seconds: float
    total: int = 0  # train rows; more than n when the CV ran on a stratified subset
    pooled: list = field(default_factory=list)  # per candidate (metric over all out-of-fold rows, log-loss) or None
    oof: tuple | None = None  # (candidate, its out-of-fold logits (n, C), labels (n,)): what calibration fits on
    copies: dict = field(default_factory=lambda: copies_record(None))  # rows kept in one fold with their copies

    def rows(self) -> list[dict]:
        out = []
        for p, sc, pooled in zip(self.candidates, self.scores, self.pooled):
            row = {"recipe": recipe_name(p), "params": {"kind": "probe" if isinstance(p, ProbeParams) else "tutorial",
                                                      **params_dict(p)}}
            if sc is None:
                row["diverged"] = True
            else:
                row.update(cv=pooled[0], cv_logloss=pooled[1], cv_mean=float(np.mean(sc)), cv_std=float(np.std(sc)),
                           per_fold=[float(a) for a in sc])
            out.append(row)
        return out

    def record(self) -> dict:
        return {"by": f"{self.folds}-fold cross-validation on train", "metric": self.metric, "folds": self.folds,
                "n": self.n, "train_rows": max(self.total, self.n),
                "on": "train" if self.total <= self.n else "train subset", "chosen": self.chosen,
                "seconds": self.seconds, "copies_in_one_fold": self.copies, "candidates": self.rows()}


def cross_validate(X, y, classes: int, candidates: list, k: int, seed: int, metric: str, device,
                   class_weight=None, groups=None, views=None) -> Selection:
    """K-fold CV of every candidate on the train rows X, y only (probes and tutorial recipes, each batch
    trained at once); the last epoch of each fold's head is scored on the fold's rows. Ranked by the metric
    over all out-of-fold predictions together (folds differ in size by a row or so), equal scores by the
    lower out-of-fold log-loss, then by the grid's order. groups: a group id per row; copies of one photo
    stay in one fold (folds.grouped_folds). views: the rows' augmented views, drawn by the tutorial recipe's
    heads from their training rows as the kept head draws them (the probes use none, as their kept head)."""
    folds = grouped_folds(y, k, seed, groups)
    y = np.asarray(y)
    Xf = np.asarray(X, dtype=np.float32)
    scores: list = [None] * len(candidates)
    pooled: list = [None] * len(candidates)
    seconds = 0.0
    tut = [i for i, p in enumerate(candidates) if isinstance(p, HeadParams)]
    probes = [i for i, p in enumerate(candidates) if isinstance(p, ProbeParams)]
    trained = []
    if tut:
        runs, sec = train_folds(Xf, y, classes, [candidates[i] for i in tut], folds, device=device,
                                class_weight=class_weight, views=views)
        seconds += sec
        trained += zip(tut, runs)
    if probes:
        runs, sec = train_probes(Xf, y, classes, [candidates[i] for i in probes], folds, class_weight=class_weight)
        seconds += sec
        trained += zip(probes, runs)
    for i, rs in trained:
        logits = _oof_logits(rs, folds, Xf, classes)
        if not np.isfinite(logits).all():
            continue  # diverged: never chosen
        pred = logits.argmax(1)
        z = logits - logits.max(1, keepdims=True)
        logloss = float((np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]).mean())
        scores[i] = [fold_score(y[folds == f], pred[folds == f], classes, metric) for f in range(k)]
        pooled[i] = (fold_score(y, pred, classes, metric), logloss)
    alive = [i for i, sc in enumerate(pooled) if sc is not None]
    if not alive:
        raise TrainingDiverged(f"every one of the {len(candidates)} candidate recipes diverged in cross-validation; "
                               "nothing was saved")
    chosen = min(alive, key=lambda i: (-pooled[i][0], pooled[i][1], i))
    oof = (chosen, _oof_logits(dict(trained)[chosen], folds, Xf, classes), y)  # the winner's, for calibration
    return Selection(metric, k, int(len(y)), list(candidates), scores, chosen, seconds, pooled=pooled, oof=oof,
                     copies=copies_record(groups))


def _oof_logits(runs, folds, Xf, classes: int) -> np.ndarray:
    """Each train row's logits from the fold head that did not train on it."""
    logits = np.zeros((len(folds), classes), dtype=np.float64)
    for r in runs:
        logits[folds == r.fold] = head_logits(r.weight, r.bias, Xf[folds == r.fold])
    return logits


def selection_table(sel: dict) -> str:
    """The CV table of metrics.json's selection record, best first, the winner marked: the metric over all
    out-of-fold rows, its spread over folds, the out-of-fold log-loss (breaks ties), per fold."""
    rows = sel["candidates"]
    order = sorted(range(len(rows)), key=lambda i: (-rows[i].get("cv", -1.0), rows[i].get("cv_logloss", 0.0), i))
    width = max(len(r["recipe"]) for r in rows)
    lines = [f"{'candidate':<{width}}  {'cv':>6} {'std':>6} {'logloss':>7}  per fold"]
    for i in order:
        r = rows[i]
        mark = "  <- chosen" if i == sel["chosen"] else ""
        if r.get("diverged"):
            lines.append(f"{r['recipe']:<{width}}  diverged (not used)")
        else:
            lines.append(f"{r['recipe']:<{width}}  {r['cv']:>6.4f} {r['cv_std']:>6.4f} {r['cv_logloss']:>7.4f}  "
                         + " ".join(f"{a:.3f}" for a in r["per_fold"]) + mark)
    return "\n".join(lines)


SWEEP_RESULTS = ("best_val_acc", "best_epoch", "best_val_ci", "diverged_epoch", "cv", "cv_mean", "cv_std")


def sweep_table(rows: list[dict], best: int | None = None) -> str:
    """One line per setting: the values that vary, (with cross-validation: CV mean and std, ranked by the
    mean), best val accuracy with its 95% interval (settings whose intervals overlap are not told apart by
    this val set), best epoch; diverged settings are marked. best: the chosen row (default: best val). With
    cross-validation the kept head of each setting is its last epoch (the rows hold its figures): the columns
    say kept, not best."""
    cv = "cv_mean" in rows[0]
    keys = [k for k in rows[0] if k not in SWEEP_RESULTS and len({r[k] for r in rows}) > 1]
    alive = [i for i, r in enumerate(rows) if "diverged_epoch" not in r]
    if best is None and alive:
        best = max(alive, key=lambda i: rows[i]["best_val_acc"])
    order = (sorted(range(len(rows)), key=lambda i: -rows[i].get("cv", rows[i].get("cv_mean", -1.0))) if cv
             else range(len(rows)))
    word = "kept" if cv else "best"
    lines = ["  ".join(f"{k:>10}" for k in keys) + ("   cv_mean   cv_std" if cv else "")
             + f"  {word}_val_acc  95% CI       correct  {word}_epoch"]
    for i in order:
        r = rows[i]
        if "diverged_epoch" in r:
            lines.append("  ".join(f"{r[k]:>10g}" for k in keys) + f"  diverged in epoch {r['diverged_epoch']} (not used)")
            continue
        mark = "  <- best" if i == best else ""
        cvs = f"  {r['cv_mean']:>8.4f} {r['cv_std']:>8.4f}" if cv else ""
        ci = r.get("best_val_ci")
        interval = f"{ci['low']:.3f}-{ci['high']:.3f}  {ci['correct']:>3}/{ci['n']:<3}" if ci else f"{'':20}"
        lines.append("  ".join(f"{r[k]:>10g}" for k in keys) + cvs
                     + f"  {r['best_val_acc']:>12.4f}  {interval}  {r['best_epoch']:>10d}{mark}")
    return "\n".join(lines)


def run_train_head(cfg: HeadConfig) -> dict:
    """Train the head(s) of cfg on its cache, write the run folder for the best one, return its metrics
    (plus report_text, and notes: pictures that could not be drawn). The run folder is locked from start to
    end and written all at once (see runfolder)."""
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
        run = _train(cfg, cache, params)
        pictures = None
        if cfg.plots:
            def pictures(into):  # drawn into the run's staging folder once model.pt is written there
                job = PictureJob(
                    str(into), run.metrics["history"], run.metrics["confusion_matrix"][cfg.val_split],
                    cache.class_names, cfg.val_split, picture_paths(cache, cfg.val_split),
                    cache.splits[cfg.val_split].labels.tolist(), run.evaluations[cfg.val_split]["pred"],
                    kept_epoch=run.best.best_epoch, calibration=run.metrics["calibration"],
                    learning_curve=run.metrics.get("learning_curve"), novelty=run.novelty.picture(), confidence=softmax(head_logits(
                        run.best.weight, run.best.bias, cache.splits[cfg.val_split].features),
                        run.temperature or 1.0).max(1).tolist())  # as predict reports them
                return lambda: draw_pictures(job)
        manifest = head_model_payload(run.best, cache)
        manifest.temperature = run.temperature
        manifest.novelty = run.novelty.model.record() if run.novelty.model is not None else None
        notes += folder.commit(manifest, run.metrics, run.report, pictures)
    return {**run.metrics, "report_text": run.report, "notes": notes}


@dataclass
class HeadRun:
    best: HeadResult
    metrics: dict
    report: str
    evaluations: dict
    temperature: float | None = None  # calibration (None: not fitted)
    novelty: object = None  # novelty.RunNovelty


def _train(cfg: HeadConfig, cache, params: list[HeadParams]) -> HeadRun:
    train = cache.splits["train"]
    classes = len(cache.class_names)
    Xtr, ytr = _split_xy(cache, "train")
    cw = class_weights(ytr, classes) if cfg.class_weight == "balanced" else None
    metric = "balanced_accuracy" if is_imbalanced(ytr, classes) else "accuracy"
    device = resolve_device(cfg.device)
    groups = _copy_groups(cfg, cache)
    views = None
    selection: Selection | None = None
    header: list[str] = []
    if cfg.recipe == "auto":
        best, selection, seconds = _train_auto(cfg, cache, metric, cw, device, groups)
        unbiased = True
        on = (f"{selection.n} images" if selection.total <= selection.n
              else f"a stratified {selection.n} of its {selection.total} images")
        header.append(f"recipe: chosen by {selection.folds}-fold cross-validation on train ({on}, "
                      f"{metric.replace('_', ' ')}); val took no part in any choice")
        header.append(selection_table(selection.record()))
        header.append(f"kept: {recipe_name(best.params)}, trained on all of train, last epoch "
                      f"(CV {selection.seconds:.2f} s, final fit {seconds - selection.seconds:.2f} s)")
        if not any(isinstance(p, HeadParams) for p in selection.candidates):
            header.append(f"(the tutorial's batch-4 recipe joins the grid up to {AUTO_TUTORIAL_MAX_ROWS} rows per "
                          "fold; --recipe tutorial runs it)")
        if train.views is not None and train.views.shape[1] > 0:
            header.append("(the cache's augmented views are used by --recipe tutorial only)")
    else:
        views = train.views if (cfg.use_views and train.views is not None and train.views.shape[1] > 0) else None
        work = len(params) * train.features.size * classes
        with cpu_threads(1 if device.type == "cpu" and work <= SMALL_HEAD_WORK else None):
            results, seconds = train_heads((Xtr, ytr), _split_xy(cache, cfg.val_split), classes, params, views=views,
                                           device=device, class_weight=cw)
        if cfg.folds:
            k = cfg.folds
            selection = cross_validate(Xtr, ytr, classes, params, k, cfg.folds_seed, metric, device, cw, groups,
                                       views)
            ranked = sorted((i for i, pl in enumerate(selection.pooled) if pl is not None),
                            key=lambda i: (-selection.pooled[i][0], selection.pooled[i][1], i))
            chosen = pick_best(results, [-float(ranked.index(i)) if i in ranked else -math.inf
                                         for i in range(len(results))])
            selection.chosen = chosen
            r = results[chosen]  # chosen on train folds: the last epoch is kept, val picks nothing
            best = HeadResult(r.params, r.last_weight, r.last_bias, r.history[-1]["val_acc"], len(r.history) - 1,
                              r.history, r.last_weight, r.last_bias, r.diverged_epoch)
            unbiased = True
            header.append(f"recipe: chosen by {k}-fold cross-validation on train ({len(ytr)} images, "
                          f"{metric.replace('_', ' ')}); last epoch kept; val took no part in any choice")
        else:
            chosen = pick_best(results)
            best = results[chosen]
            unbiased = False
            which = "the setting and its epoch" if len(results) > 1 else "the epoch"
            header.append(f"recipe: the tutorial's family ({recipe_name(best.params)}); the epoch with the best "
                          f"val accuracy is kept, so the val figure is optimistic (val picked {which})")
    curve = None
    if cfg.learning_curve:
        curve = learning_curve(Xtr, ytr, *_split_xy(cache, cfg.val_split), classes, best.params, metric, cw,
                               seed=cfg.folds_seed, views=views, groups=groups)
        header.append(learning_curve_table(curve))
        if not unbiased:
            header.append("(the curve scores each head's last epoch; the kept head is val's best epoch, so its val "
                          "figure can differ from the 100% point)")
    copies = copies_line(groups, " and ".join(w for w, used in (("fold", selection), ("learning-curve share", curve))
                                              if used is not None))
    if copies and (selection is not None or curve is not None):
        header.append(copies)
    eval_splits = [cfg.val_split] + [s for s in cache.splits if s not in ("train", cfg.val_split)]
    evaluations = head_classification_metrics(best, cache, eval_splits)
    cal = calibrate_head(best.weight, best.bias, selection, cache, eval_splits)  # val and test untouched by it
    novelty = run_novelty(Xtr, ytr, _novelty_folds(ytr, groups, cfg.folds_seed),
                          {s: _split_xy(cache, s)[0] for s in eval_splits})
    metrics = run_metrics(
        "head", evaluations, val_split=cfg.val_split, best_val_acc=best.best_val_acc, best_epoch=best.best_epoch,
        history=best.history, class_names=cache.class_names, seconds=seconds,
        recipe={"kind": "probe" if isinstance(best.params, ProbeParams) else "tutorial", **params_dict(best.params)},
        n={s: int(len(cache.splits[s].labels)) for s in cache.splits}, skipped=cache.skipped,
        split=cache.meta.split or cache_record(None), backbone=cache.meta.backbone, weights=cache.meta.weights)
    metrics.update({  # train-head's own
        "recipe_mode": cfg.recipe,
        "kept_epoch": "best val" if not unbiased else "last",
        "val_unbiased": unbiased,
        "class_weight": None if cw is None else {"mode": cfg.class_weight, "weights": cw.tolist()},
        "views_used": views is not None,
        "cache": str(cfg.cache),
        "calibration": cal.record,
        "novelty": novelty.record,
    })
    if curve is not None:
        metrics["learning_curve"] = curve
    if selection is not None:
        metrics["selection"] = selection.record()
        if selection.scores[selection.chosen] is not None and cfg.recipe != "auto":
            sc = selection.scores[selection.chosen]
            metrics["cv"] = {"folds": selection.folds, "mean": float(np.mean(sc)), "std": float(np.std(sc)),
                             "per_fold": [float(a) for a in sc], "seed": cfg.folds_seed, "n": selection.n,
                             "on": "train", "metric": metric, "seconds": selection.seconds}
    if cfg.recipe != "auto" and len(results) > 1:
        n_val = len(cache.splits[cfg.val_split].labels)
        cvs = selection.rows() if selection is not None else [None] * len(results)
        metrics["sweep"] = [{**row, **({"best_val_ci": ci_from_accuracy(row["best_val_acc"], n_val)}
                                       if "diverged_epoch" not in row else {}),
                             **({"cv": cv["cv"], "cv_mean": cv["cv_mean"], "cv_std": cv["cv_std"]}
                                if cv and "cv_mean" in cv else {})}
                            for row, cv in zip(sweep_rows(results, last=selection is not None), cvs)]
        metrics["chosen"] = chosen
        header.insert(1, sweep_table(metrics["sweep"], chosen))
    if cfg.recipe != "auto" and cfg.folds and "cv" in metrics:
        c = metrics["cv"]
        header.append(f"{c['folds']}-fold CV on train ({c['n']} images): mean {c['mean']:.4f}, std {c['std']:.4f} "
                      f"(folds {' '.join(f'{a:.4f}' for a in c['per_fold'])}; trained in {c['seconds']:.3f} s)")
    word, note = (("val acc", "unbiased: no choice saw val") if unbiased
                  else ("best val acc", "optimistic: val picked it"))
    kept = f"{word} {format_accuracy(evaluations[cfg.val_split]['accuracy_ci'])} at epoch {best.best_epoch} ({note})"
    report = run_report_text(metrics, evaluations, kept, [*header, *cal.lines, *novelty.lines])
    return HeadRun(best, metrics, report, evaluations, cal.temperature, novelty)


def _novelty_folds(y, groups, seed: int) -> np.ndarray | None:
    """Folds for the novelty threshold's out-of-fold scores (copies in one fold); None: fewer than 2 photos."""
    k = min(NOVELTY_FOLDS, len(np.unique(groups)))
    return grouped_folds(y, k, seed, groups) if k >= 2 else None


def _copy_groups(cfg: HeadConfig, cache) -> np.ndarray:
    """A group id per train row (folds.split_copy_groups): copies of one photo stay in one fold and one share of
    the learning curve. Refuses what cannot be folded: every row alike, or more folds than distinct photos."""
    groups = split_copy_groups(cache)
    n, photos = len(groups), len(np.unique(groups))
    if photos == 1 < n and (cfg.folds or cfg.recipe == "auto"):
        raise PipelineError(f"the {n} train images all have the same features: they carry no information that tells "
                            "the photos apart (check the backbone and its weights, then extract again with --force); "
                            "cross-validation cannot fold one photo")
    if cfg.folds and not 2 <= cfg.folds <= photos:
        rows = f" ({n} rows: a photo's copies count once)" if photos < n else ""
        raise PipelineError(f"--folds {cfg.folds} needs 2 <= folds <= the {photos} images of train{rows} (folds never "
                            f"draw from {cfg.val_split})")
    return groups


def _train_auto(cfg: HeadConfig, cache, metric: str, cw, device, groups) -> tuple[HeadResult, Selection, float]:
    """--recipe auto: CV on train over the grid, then the winner trained on all of train (last epoch kept).
    groups: a group id per train row; copies of one photo stay in one fold and in or out of the CV subset."""
    Xtr, ytr = _split_xy(cache, "train")
    classes = len(cache.class_names)
    seed = cfg.seed[0]
    n = len(ytr)
    rows = np.arange(n)
    if n > AUTO_CV_MAX_ROWS:  # a stratified subset: one of ceil(n / max) stratified parts
        rows = np.flatnonzero(grouped_folds(ytr, math.ceil(n / AUTO_CV_MAX_ROWS), cfg.folds_seed + 1, groups) == 0)
    k = min(cfg.folds or auto_folds(len(rows)), len(np.unique(groups[rows])))
    if k < 2:
        photos = len(np.unique(groups))
        held = f"{n} images" if photos == n else f"{photos} distinct images ({n} rows: copies count once)"
        raise PipelineError(f"the automatic recipe cross-validates on train, which has {held}: too few; "
                            "add images or use --recipe tutorial")
    fold_rows = len(rows) - len(rows) // k  # rows a fold's head trains on
    grid = auto_grid(fold_rows, seed)
    sel = cross_validate(Xtr[rows], ytr[rows], classes, grid, k, cfg.folds_seed, metric, device, cw, groups[rows])
    sel.total = n
    p = grid[sel.chosen]
    if isinstance(p, ProbeParams) and len(rows) < n:  # chosen on a subset: the same steps on all rows
        p = scaled_to(p, fold_rows, n)
    val = _split_xy(cache, cfg.val_split)
    if isinstance(p, ProbeParams):
        (runs,), sec = train_probes(Xtr, ytr, classes, [p], None, val=val, class_weight=cw)
        r = runs[0]
        if r.diverged:
            raise TrainingDiverged("the chosen recipe diverged on all of train; nothing was saved")
        hist = r.history
        best = HeadResult(p, r.weight, r.bias, hist[-1]["val_acc"], len(hist) - 1, hist, r.weight, r.bias, None)
    else:
        with cpu_threads(1 if device.type == "cpu" and Xtr.size * classes <= SMALL_HEAD_WORK else None):
            (r,), sec = train_heads((Xtr, ytr), val, classes, [p], device=device, class_weight=cw)
        pick_best([r])
        best = HeadResult(p, r.last_weight, r.last_bias, r.history[-1]["val_acc"], len(r.history) - 1, r.history,
                          r.last_weight, r.last_bias, None)
    return best, sel, sel.seconds + sec

