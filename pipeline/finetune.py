"""Finetune: the tutorial's end-to-end scenario (all weights trained, augmentation on the fly), or its
frozen scenario run end to end (--freeze-backbone), with per-epoch checkpoints and exact resume."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import PipelineError
from .backbones import TIMM_PREFIX, BackboneSpec, build_torchvision, replace_module
from .data import TRANSFORM_SPEC, EpochSampler, ImageChanged, LabelledImages, check_usable_classes, eval_transform, \
    find_unreadable, scan_dataset, train_transform, worker_error_line
from .distributed import Dist, init_distributed, rank_device, shutdown
from .head import TrainingDiverged
from .recipe import TUTORIAL_RECIPE, check_recipe
from .metrics import classification_metrics, format_accuracy, run_metrics, run_report_text
from .preprocess import JPEG_DECODES, Preprocess, decode_mode, jpeg_draft
from .progress import Progress
from .fsio import atomic_write_json, sha256_json
from .runfolder import CHECKPOINT, VERDICTS, FinetuneCheckpoint, ModelFileError, RunFolder, RunManifest
from .runtime import Runtime, default_workers, resolve_runtime
from .plots import PictureJob, draw_pictures, import_in_background

# the FinetuneConfig fields a checkpoint records (as its recipe) and --resume requires unchanged (the rest, like
# workers, may change)
RESUME_KEYS = ("backbone", "weights", "freeze_backbone", "epochs", "lr", "momentum", "step_size", "gamma",
               "batch_size", "seed", "splits", "val_fraction", "test_fraction", "split_seed", "jpeg_decode")


@dataclass
class FinetuneConfig:
    data_dir: str
    out: str
    backbone: str = "resnet18"
    weights: str = "imagenet"
    freeze_backbone: bool = False
    epochs: int = TUTORIAL_RECIPE.epochs
    lr: float = TUTORIAL_RECIPE.lr
    momentum: float = TUTORIAL_RECIPE.momentum
    step_size: int = TUTORIAL_RECIPE.step_size
    gamma: float = TUTORIAL_RECIPE.gamma
    batch_size: int = TUTORIAL_RECIPE.batch_size
    workers: int = field(default_factory=default_workers)
    device: str = "auto"
    precision: str = "auto"  # fp32 on CPU; bf16 autocast on CUDA; fp16 uses a grad scaler
    seed: int = 0
    resume: bool = False
    splits: tuple[str, ...] = ("train", "val")
    allow_empty_class: bool = False
    max_skipped: float | None = None
    plots: bool = True
    val_fraction: float | None = None  # flat folders only, as for extract: the same split for the same flags
    test_fraction: float | None = None
    split_seed: int = 0
    cache: str | None = None  # a feature cache of the same folder: its decode verdicts skip the decode pass
    jpeg_decode: str = "auto"  # auto = fast: JPEGs at the DCT scale keeping the short side >= 2 x 256 | exact | draft


def finetune_spec(cfg: FinetuneConfig) -> Preprocess:
    """The preprocessing finetune's images get (decoded by PIL; RandomResizedCrop for train, the tutorial's
    eval transform for the rest), recorded in model.pt for predict."""
    return Preprocess(draft=jpeg_draft(cfg.jpeg_decode, "pil"))


def build_classifier(cfg_backbone: str, weights: str, seed: int, classes: int) -> tuple[nn.Module, str, str]:
    """torchvision model with backbone weights and a new Linear head (nn.Linear init under seed)."""
    model, head, digest = build_torchvision(BackboneSpec(cfg_backbone, weights, seed))
    if cfg_backbone.startswith(TIMM_PREFIX):  # timm's own way: reset_classifier
        from .timm_backbone import reset_for

        reset_for(model, classes, seed)
        return model, head, digest
    in_features = model.get_submodule(head).in_features
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        replace_module(model, head, nn.Linear(in_features, classes))
    return model, head, digest




def _identity(path: str) -> list[int] | None:
    """What says a file is unchanged since its verdict: inode, size, mtime and ctime (ns)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def load_verdicts(path: Path | None) -> dict[str, list]:
    """{absolute file: [identity, reason]} from an earlier run into the same folder; {} when none/unreadable."""
    if path is None or not path.is_file():
        return {}
    try:
        known = json.loads(path.read_text())["files"]
        return {k: v for k, v in known.items() if isinstance(v, list) and len(v) == 2}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # a damaged verdicts file only costs a decode pass


def cache_verdicts(cache_path: str | os.PathLike, root: Path,
                   draft: int = JPEG_DECODES["fast"]) -> dict[str, tuple[int, int]]:
    """{absolute file: (size, mtime_ns)} of every file a feature cache of the same folder decoded and
    used. Only a cache decoded as finetune decodes (PIL, JPEGs at finetune's draft margin, EXIF applied)
    says anything about finetune's files; any other cache is refused with the reason."""
    from cache import read_cache
    from cache.reuse import vouched_files

    cache = read_cache(cache_path, with_views=False)
    a = cache.meta
    spec = Preprocess.from_record(a.transform, a.draft, a.decoder)
    if spec.decoder != "pil" or spec.draft != draft or not spec.exif:
        jpeg = f", --jpeg-decode {decode_mode(spec.draft)}" if spec.draft != draft else ""
        raise PipelineError(f"cache {cache_path} was decoded differently from finetune (decoder {spec.decoder}"
                            f"{jpeg}{', no EXIF' if not spec.exif else ''}); its "
                            "verdicts do not carry over: drop --cache")
    if cache.file_stats is None:
        raise PipelineError(f"cache {cache_path} predates file records; extract it again to use it with --cache")
    recorded = a.data_root
    if recorded is None or not os.path.isabs(recorded):  # caches before data_root: only as typed
        raise PipelineError(f"cache {cache_path} does not record which folder it was extracted from; extract it "
                            "again with --force to use it with --cache")
    if Path(recorded).resolve() != root.resolve():
        raise PipelineError(f"cache {cache_path} was extracted from {recorded}, not from {root.resolve()}; drop "
                            "--cache or give the cache of this folder")
    return vouched_files(cache, root)


DECODE_NOTE_MIN = 100  # images to decode from which the decode pass is announced (seconds or more)


def usable_files(data, workers: int, max_skipped: float | None, d: Dist = Dist(),
                 verdicts: Path | None = None, from_cache: dict | None = None, log=None) -> tuple[dict, list]:
    """{split: (files, labels, rel paths)} of files that decode, and (path, reason) of all the others.

    A full decode finds damaged files; it is skipped for files whose verdict an earlier run into the same
    folder recorded (verdicts file) and that have not changed since (same inode, size, mtime, ctime), and
    for files a feature cache of the folder decoded and used (from_cache: cache_verdicts) that have the
    size and mtime they had then. Under torchrun each rank decodes its share of the rest and the verdicts are
    gathered.
    """
    skipped = [s for sp in data.splits.values() for s in sp.skipped]
    known = load_verdicts(verdicts)
    from_cache = from_cache or {}
    files = {name: [str(data.root / p) for p in sp.paths] for name, sp in data.splits.items()}
    ids = {f: _identity(f) for fs in files.values() for f in fs}
    key = {f: os.path.abspath(f) for f in ids}  # the same file whatever folder the command runs from
    todo = [f for f in ids if ids[f] is None or known.get(key[f], [None])[0] != ids[f]]
    cached = {f: known[key[f]][1] for f in ids if f not in set(todo)}
    vouched = {f: "" for f in todo if ids[f] is not None and from_cache.get(key[f]) == (ids[f][1], ids[f][2])}
    todo = [f for f in todo if f not in vouched]
    cached |= vouched
    todo, cached = d.broadcast((todo, cached))  # rank 0's view decides: every rank decodes the same shard
    lo, hi = d.shard(len(todo))
    if log is not None and len(todo) >= DECODE_NOTE_MIN and d.is_main:  # minutes for a big folder: say why
        log(f"decoding {len(todo)} of {len(ids)} images once to find unreadable ones (later runs into this "
            "folder reuse the verdicts)")
    found = [r for part in d.all_gather(find_unreadable(todo[lo:hi], workers)) for r in part]
    reason = cached | dict(zip(todo, found))
    if verdicts is not None and d.is_main and todo:  # what was decoded; a cache's word is not kept
        atomic_write_json(verdicts, {"version": 1, "files": {key[f]: [ids[f], reason[f]] for f in ids
                                                              if ids[f] is not None and f not in vouched}})
    out = {}
    total = 0
    for name, sp in data.splits.items():
        reasons = [reason[f] for f in files[name]]
        keep = [i for i, r in enumerate(reasons) if not r]
        skipped += [(sp.paths[i], r) for i, r in enumerate(reasons) if r]
        out[name] = ([files[name][i] for i in keep], [sp.labels[i] for i in keep], [sp.paths[i] for i in keep])
        total += len(files[name]) + len(sp.skipped)
    if max_skipped is not None and total:
        limit = max_skipped * total if max_skipped < 1 else max_skipped
        if len(skipped) > limit:
            raise PipelineError(f"{len(skipped)} of {total} files are unusable (more than --max-skipped {max_skipped:g})")
    for name, (kept, _, _) in out.items():
        if not kept:
            raise PipelineError(f"the {name} split of {data.root} has no usable images (all were skipped)")
    return out, sorted(skipped)


class _SplitImages(torch.utils.data.Dataset):
    """Several LabelledImages behind one index, (split, epoch, i) -> (x, label): one dataset, so one set
    of DataLoader workers serves training, validation and the final test pass."""

    def __init__(self, parts: list[LabelledImages]):
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, key):
        g, epoch, i = key
        return self.parts[g][(epoch, i)]


class _PassBatches(torch.utils.data.Sampler):
    """Batches of the splits in `plan`, one split after the other: each split's EpochSampler keys cut into
    consecutive batches exactly as DataLoader(batch_size, sampler) does (last batch may be short)."""

    def __init__(self, samplers: list[EpochSampler], batch_size: int):
        self.samplers, self.batch_size, self.plan = samplers, batch_size, []

    def batches(self, g: int) -> int:
        return -(-len(self.samplers[g]) // self.batch_size)

    def __len__(self) -> int:
        return sum(self.batches(g) for g in self.plan)

    def __iter__(self):
        for g in self.plan:
            keys = list(self.samplers[g])
            for s in range(0, len(keys), self.batch_size):
                yield [(g, e, i) for e, i in keys[s:s + self.batch_size]]


class SplitBatches:
    """The batches of one split within a pass of the shared loader. Iterate it once, in pass order;
    .sampler is the split's EpochSampler (loss_accuracy_predictions reads which images this rank saw);
    on_batch() is called after each batch has been used (the progress bar moves per batch, not per epoch)."""

    def __init__(self, source, sampler: EpochSampler, n_batches: int, on_batch=None):
        self.source, self.sampler, self.n_batches = source, sampler, n_batches
        self.on_batch = on_batch

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        for _ in range(self.n_batches):
            yield next(self.source)
            if self.on_batch is not None:
                self.on_batch()


class SharedLoader:
    """One DataLoader, one set of persistent workers, for every split of a finetune run (they were started
    once per split before). pass_(epoch, splits) -> one SplitBatches per split, consumed in that order;
    the workers prefetch the next split's batches while the current one's last batches are computed."""

    def __init__(self, groups: list[tuple[list[str], list[int], object, bool]], seed: int, batch_size: int,
                 workers: int, rt: Runtime, d: Dist = Dist(), draft: tuple[int, int] | None = None):
        self.samplers = [EpochSampler(len(f), seed, shuffle, d.rank, d.world) for f, _, _, shuffle in groups]
        self.batch_sampler = _PassBatches(self.samplers, batch_size)
        ds = _SplitImages([LabelledImages(f, y, tf, seed, draft) for f, y, tf, _ in groups])
        self.loader = torch.utils.data.DataLoader(ds, batch_sampler=self.batch_sampler, num_workers=workers,
                                                  pin_memory=rt.pin_memory, persistent_workers=workers > 0)
        self.on_batch = None  # called after each batch of every pass (progress)

    def close(self) -> None:
        """End the workers now, before the pictures are drawn, rather than in the interpreter's exit (~1 s)."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None

    def pass_(self, epoch: int, splits: list[int]) -> list[SplitBatches]:
        for s in self.samplers:
            s.set_epoch(epoch)
        self.batch_sampler.plan = list(splits)
        it = iter(self.loader)
        return [SplitBatches(it, self.samplers[g], self.batch_sampler.batches(g), self.on_batch) for g in splits]


def check_optimizer_state(sd: dict, params: list) -> None:
    """torch.optim loads momentum buffers of any shape and fails only at the first step, mid-run: check
    them against the parameters first (ValueError, reported as a checkpoint that does not fit)."""
    groups = sd.get("param_groups") or []
    if len(groups) != 1 or len(groups[0].get("params", [])) != len(params):
        raise ValueError("the optimizer state does not match this model's parameters")
    for i, st in (sd.get("state") or {}).items():
        buf = st.get("momentum_buffer") if isinstance(st, dict) else None
        if not (isinstance(i, int) and 0 <= i < len(params)) or (
                buf is not None and (not isinstance(buf, torch.Tensor) or buf.shape != params[i].shape)):
            raise ValueError(f"momentum buffer {i} does not fit parameter {i}")


def train_one_epoch(model, loader, optimizer, scaler, criterion, rt: Runtime) -> tuple[float, float, int]:
    """One pass over this process's train batches; returns (loss sum, correct, images). Statistics stay on
    the device until the end of the epoch (no sync per step)."""
    model.train()
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.long)
    n = 0
    for x, y in loader:
        x = x.to(rt.device, non_blocking=True).contiguous(memory_format=rt.memory_format)
        y = y.to(rt.device, non_blocking=True)
        with rt.autocast():
            out = model(x)
            loss = criterion(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach() * len(y)
        correct += (out.argmax(1) == y).sum()
        n += len(y)
    return float(loss_sum), float(correct), n


@torch.inference_mode()
def loss_accuracy_predictions(model, loader, criterion, rt: Runtime,
                              d: Dist = Dist()) -> tuple[float, float, np.ndarray]:
    """(mean loss, accuracy, predictions in dataset order) in eval mode; under torchrun each rank
    evaluates its stride of the images and the predictions are gathered, so every rank gets all."""
    model.eval()
    loss_sum = torch.zeros((), device=rt.device)
    preds, labels = [], []
    for x, y in loader:
        x = x.to(rt.device, non_blocking=True).contiguous(memory_format=rt.memory_format)
        y = y.to(rt.device, non_blocking=True)
        with rt.autocast():
            out = model(x).float()
        loss_sum += criterion(out, y) * len(y)
        preds.append(out.argmax(1).cpu())
        labels.append(y.cpu())
    p = torch.cat(preds).numpy() if preds else np.zeros(0, np.int64)
    t = torch.cat(labels).numpy() if labels else np.zeros(0, np.int64)
    (loss_total,) = d.all_sum([float(loss_sum)])
    idx = loader.sampler.indices()  # this rank's images, in the order evaluated
    n = loader.sampler.n
    full = np.zeros(n, np.int64)
    truth = np.zeros(n, np.int64)
    for ids, pr, tr in d.all_gather((idx, p, t)):
        full[ids], truth[ids] = pr, tr
    if n == 0:
        return 0.0, 0.0, full
    return loss_total / n, float((full == truth).mean()), full


def checkpoint_note(path: Path) -> list[str]:
    """What a finished run says about its checkpoint: it holds the last epoch's resume state (the weights,
    the optimizer's momentum, the RNG), which a finished run no longer needs; the user may delete it."""
    if not path.is_file():
        return []
    return [f"{path} ({path.stat().st_size / 1e6:.0f} MB) is the last epoch's resume state; the run is complete and "
            "model.pt holds the kept weights, so it can be deleted to free the space"]


def recorded_recipe(recipe: dict | None) -> dict:
    """A checkpoint's recipe as _recipe writes it now: one made before fast decoding decoded full size."""
    return {"jpeg_decode": "exact", **(recipe or {})}


def _recipe(cfg: FinetuneConfig) -> dict:
    d = asdict(cfg)
    d["jpeg_decode"] = decode_mode(finetune_spec(cfg).draft)  # auto recorded as what it is (fast)
    return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in RESUME_KEYS}


def _files_digest(files: dict) -> str:
    return sha256_json({k: [v[2], v[1]] for k, v in files.items()})


def file_stats(data, files: dict) -> dict[str, list[int]]:
    """{relative path: [size, mtime_ns]} of the usable files, from the scan's stat of each."""
    stat = {p: [int(size), int(mtime)] for sp in data.splits.values()
            for p, size, mtime in zip(sp.paths, sp.sizes, sp.mtimes)}
    return {p: stat[p] for _, _, paths in files.values() for p in paths}


def changed_files(recorded: dict[str, list[int]], now: dict[str, list[int]]) -> list[str]:
    """Files recorded at the checkpoint whose size or mtime differs now (same path: other content)."""
    return sorted(p for p, st in recorded.items() if p in now and list(now[p]) != list(st))


def _load_checkpoint(cfg: FinetuneConfig, digest: str, stats: dict | None = None) -> FinetuneCheckpoint | None:
    path = Path(cfg.out) / CHECKPOINT
    if not cfg.resume:
        if path.exists():
            raise PipelineError(f"{cfg.out} holds a checkpoint of an earlier run; pass --resume to continue it, "
                                "or choose another --out")
        return None
    if not path.exists():
        return None
    ck = FinetuneCheckpoint.load(path)
    made = recorded_recipe(ck.recipe)
    if made != _recipe(cfg):
        diff = [k for k in RESUME_KEYS if made.get(k) != _recipe(cfg)[k]]
        raise PipelineError(f"cannot resume {cfg.out}: its checkpoint was made with other settings "
                            f"({', '.join(diff)}); use the same flags or another --out")
    if ck.files_digest != digest:
        raise PipelineError(f"cannot resume {cfg.out}: the usable files of {cfg.data_dir} changed since the checkpoint")
    changed = changed_files(ck.file_stats or {}, stats or {})
    if changed:  # the epochs so far learned (and were selected) on the old pictures
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise PipelineError(f"cannot resume {cfg.out}: {len(changed)} file{'s' * (len(changed) != 1)} of "
                            f"{cfg.data_dir} changed since the checkpoint (same path, other size or modification "
                            f"time): {shown}; put {'them' if len(changed) != 1 else 'it'} back, or start again "
                            "in another --out")
    return ck


def selection_splits(splits: tuple[str, ...]) -> tuple[str, str]:
    """(train split, the split that selects the best epoch): the first two the user named. A test split
    (added by the scan when present) is only evaluated at the end, never used to select anything."""
    if len(splits) < 2:
        raise PipelineError("finetune needs a val split to select the best epoch: pass --splits train,val "
                            "(a test split is only evaluated at the end, never used to select)")
    if splits[1] == "test":
        raise PipelineError("the test split cannot select the best epoch (that would make its scores "
                            "optimistic): pass --splits train,val; test is evaluated at the end when present")
    return splits[0], splits[1]


def nonfinite_part(train_loss: float, val_loss: float, model: nn.Module, precision: str) -> str:
    """What became NaN or infinite after an epoch ('' when nothing). Under fp16 a loss that overflows to
    infinity is the grad scaler's business (it skips that step); NaN never is."""
    bad = math.isnan if precision == "fp16" else (lambda v: not math.isfinite(v))
    if bad(train_loss):
        return f"the train loss ({train_loss})"
    if bad(val_loss):
        return f"the val loss ({val_loss})"
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"the weights ({name})"
    return ""


def local_batch_size(global_batch: int, world: int) -> int:
    """Per-process batch keeping the global batch (and so the recipe) when world divides it; otherwise
    the next size up, so the global batch becomes local * world (said in the log and README)."""
    return -(-global_batch // world)


def finetune(cfg: FinetuneConfig, progress: Progress | None = None) -> dict:
    """Train, checkpoint every epoch, write the run folder; returns metrics (plus report_text).

    Under torchrun: DistributedDataParallel, each rank its share of every epoch (DistributedSampler
    order), metrics summed over ranks, and only rank 0 writes checkpoints and the run folder.
    """
    d = init_distributed(cfg.device)
    try:  # report and pictures in this process: a second one did not pay here (it competes with training)
        return _finetune(cfg, progress or Progress(), d)
    finally:
        shutdown(d)  # a process group left to the interpreter's exit can abort (SIGABRT) under gloo


def _finetune(cfg: FinetuneConfig, progress: Progress, d: Dist) -> dict:
    """Rank 0 holds the run folder (locked, one kind of run, committed at the end) for the whole run."""
    from .extract import check_split_names

    check_split_names(cfg.splits)  # plain sub-folders of DATA_DIR: no '..', no absolute paths
    splits = selection_splits(tuple(cfg.splits))
    check_recipe(epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum, step_size=cfg.step_size, gamma=cfg.gamma,
                 batch_size=cfg.batch_size)
    folder = RunFolder(cfg.out, "finetune") if d.is_main else None
    with folder or contextlib.nullcontext():
        try:
            return _train(cfg, progress, d, folder, splits)
        except ImageChanged as e:  # from a DataLoader worker the message is a whole traceback: one line
            raise ImageChanged(worker_error_line(e)) from None


def _cpu_copy(tree):
    """A state_dict (nested dicts/lists of tensors) with every tensor copied to the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_cpu_copy(v) for v in tree]
    return tree


def _train(cfg: FinetuneConfig, progress: Progress, d: Dist, folder: RunFolder | None,
           splits: tuple[str, str]) -> dict:
    train_name, val_name = splits
    rt = resolve_runtime(rank_device(cfg.device, d), cfg.precision)
    data = scan_dataset(cfg.data_dir, list(cfg.splits), cfg.allow_empty_class, cfg.val_fraction, cfg.test_fraction,
                        cfg.split_seed)
    spec = finetune_spec(cfg)
    from_cache = cache_verdicts(cfg.cache, data.root, spec.draft) if cfg.cache else None
    files, skipped = usable_files(data, cfg.workers, cfg.max_skipped, d, Path(cfg.out) / VERDICTS, from_cache,
                                  log=progress.log)
    check_usable_classes(data, files[train_name][1], skipped, cfg.allow_empty_class)  # no class left without images
    names = list(files)
    digest = _files_digest(files)
    stats = file_stats(data, files)
    ck = _load_checkpoint(cfg, digest, stats)
    batch = local_batch_size(cfg.batch_size, d.world)
    if batch * d.world != cfg.batch_size:
        progress.log(f"--batch-size {cfg.batch_size} does not split over {d.world} processes: "
                     f"{batch} per process, global batch {batch * d.world}")

    model, head, weights_digest = build_classifier(cfg.backbone, cfg.weights, cfg.seed, len(data.class_names))
    if cfg.freeze_backbone:  # the tutorial's fixed feature extractor: only the new layer learns
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.get_submodule(head).parameters():
            p.requires_grad_(True)
    model = model.to(rt.device).to(memory_format=rt.memory_format)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16")
    criterion = nn.CrossEntropyLoss()

    history, best_acc, best_epoch, start, best_preds = [], -1.0, -1, 0, None
    best_state = None  # set by the first epoch (every accuracy beats -1) or by the checkpoint
    seconds = 0.0
    if ck is not None:
        try:
            model.load_state_dict(ck.model)
            check_optimizer_state(ck.optimizer, params)
            optimizer.load_state_dict(ck.optimizer)
            scheduler.load_state_dict(ck.scheduler)
            scaler.load_state_dict(ck.scaler)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ModelFileError(f"{Path(cfg.out) / CHECKPOINT} cannot be resumed: it does not fit this model and "
                                 f"recipe ({type(e).__name__}: {first}); choose another --out") from None
        history, best_acc, best_epoch = ck.history, ck.best_acc, ck.best_epoch
        best_state, start, seconds = ck.best_state, ck.epoch + 1, ck.seconds
        best_preds = ck.best_preds.numpy()
        # shuffling and augmentation are keyed by (seed, epoch, image) and do not need it; restored so any
        # other use of torch's RNG continues as it would have
        torch.random.set_rng_state(ck.rng_torch)
        progress.log(f"resuming {cfg.out} after epoch {ck.epoch} of {cfg.epochs}" + (
            "" if ck.file_stats is not None else " (an older checkpoint: files changed in place are not detected)"))
    if ck is None:  # dropout and any other draw in the loop: the same run for the same --seed
        torch.manual_seed(cfg.seed)
    net = model
    if d.enabled:  # gradients averaged over ranks; the unwrapped model holds the weights we save
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

    # one set of workers for every split; group g of the loader is split names[g]
    loaders = SharedLoader([(files[s][0], files[s][1], train_transform() if s == train_name else eval_transform(),
                             s == train_name) for s in names], cfg.seed, batch, cfg.workers, rt, d, spec.draft_size())
    train_g, val_g = names.index(train_name), names.index(val_name)
    per_epoch = loaders.batch_sampler.batches(train_g) + loaders.batch_sampler.batches(val_g)
    progress.start(cfg.epochs * per_epoch, f"finetune ({cfg.epochs} epochs of {per_epoch} batches)")
    progress.update(start * per_epoch)
    loaders.on_batch = lambda: progress.update(1)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        train_part, val_part = loaders.pass_(epoch, [train_g, val_g])
        if epoch == start and cfg.plots and d.is_main:  # the persistent workers are forked by now
            import_in_background()
        lr = optimizer.param_groups[0]["lr"]
        loss_sum, correct, n = d.all_sum(list(train_one_epoch(net, train_part, optimizer, scaler, criterion, rt)))
        train_loss, train_acc = loss_sum / n, correct / n
        scheduler.step()
        val_loss, val_acc, val_preds = loss_accuracy_predictions(net, val_part, criterion, rt, d)
        if bad := nonfinite_part(train_loss, val_loss, model, rt.precision):
            kept = f"the checkpoint keeps epoch {epoch - 1}" if epoch else "no checkpoint was written"
            raise TrainingDiverged(f"finetune diverged in epoch {epoch}: {bad} became NaN or infinite; nothing was "
                                   f"saved as a model ({kept}); lower --lr (or check --weights) and start again "
                                   "in a new --out")
        if val_acc > best_acc:  # strict: the first best epoch wins ties, as in the tutorial
            best_acc, best_epoch, best_preds = val_acc, epoch, val_preds
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        took = time.perf_counter() - t0
        seconds += took
        history.append({"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
                        "val_loss": val_loss, "val_acc": val_acc, "seconds": took})
        if folder is not None:  # written while the next epoch trains: copies, never the live tensors
            folder.save_checkpoint(FinetuneCheckpoint(
                # a best epoch's copy is the model itself: one copy, and torch.save stores it once
                epoch=epoch, model=best_state if best_epoch == epoch else _cpu_copy(model.state_dict()),
                optimizer=_cpu_copy(optimizer.state_dict()),
                scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), history=copy.deepcopy(history),
                best_acc=best_acc, best_epoch=best_epoch, best_state=best_state,
                best_preds=torch.as_tensor(best_preds).clone(), seconds=seconds, recipe=_recipe(cfg),
                files_digest=digest, rng_torch=torch.random.get_rng_state(), file_stats=stats))
            seconds += time.perf_counter() - t0 - took  # the checkpoint's copies are this epoch's work too
        progress.log(f"epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
                     f"val loss {val_loss:.4f} acc {val_acc:.4f} | {took:.1f} s")
    progress.close()
    loaders.on_batch = None

    if best_epoch != cfg.epochs - 1:  # otherwise the model holds the best epoch's weights already
        model.load_state_dict(best_state)
    preds = {val_name: best_preds}  # val predictions of the best epoch; other splits (test) evaluated now
    rest = [g for g, s in enumerate(names) if s not in (train_name, val_name)]
    for g, part in zip(rest, loaders.pass_(cfg.epochs, rest) if rest else []):
        preds[names[g]] = loss_accuracy_predictions(net, part, criterion, rt, d)[2]
    evaluations = {s: classification_metrics(list(files[s][1]), np.asarray(p).tolist(), data.class_names)
                   for s, p in preds.items()}
    metrics = run_metrics(
        "finetune", evaluations, val_split=val_name, best_val_acc=best_acc, best_epoch=best_epoch, history=history,
        class_names=data.class_names, seconds=seconds, recipe=_recipe(cfg), n={s: len(f[0]) for s, f in files.items()},
        skipped=skipped, split=data.split_record(), backbone=cfg.backbone, weights=cfg.weights)
    metrics.update(precision=rt.precision, device=str(rt.device), processes=d.world)  # finetune's own
    report = run_report_text(metrics, evaluations,
                             f"best val acc {format_accuracy(metrics['best_val_acc_ci'])} at epoch {best_epoch}")
    metrics["report_text"] = report
    if not d.is_main:
        return metrics
    manifest = RunManifest(
        kind="finetune", class_names=data.class_names,
        state_dict={k: v.detach().cpu() for k, v in best_state.items()}, recipe=_recipe(cfg),
        precision=rt.precision, transform=spec.record(), draft=bool(spec.draft), arch=cfg.backbone, head=head,
        weights_digest=weights_digest, split=data.split_record())
    notes: list[str] = []
    pictures = None
    if cfg.plots:
        def pictures(into):  # drawn into the run's staging folder once model.pt is written there
            loaders.close()  # the workers end before the pictures are drawn
            job = PictureJob(
                str(into), history, metrics["confusion_matrix"][val_name], data.class_names, val_name,
                [str(Path(f).absolute()) for f in files[val_name][0]], list(files[val_name][1]),
                np.asarray(preds[val_name]).tolist(), kept_epoch=best_epoch)
            return lambda: draw_pictures(job)
    notes += folder.commit(manifest, {k: v for k, v in metrics.items() if k != "report_text"}, report, pictures)
    loaders.close()
    notes += checkpoint_note(Path(cfg.out) / CHECKPOINT)
    metrics["notes"] = notes
    return metrics
