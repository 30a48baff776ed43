"""Extraction: run the frozen backbone once per image (and per augmented view) into the feature cache."""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from cache import CacheError, CacheMissing
from cache.store import FORMAT, CacheLock, PartialWriter, files_digest, fingerprint, read_attrs, read_cache

from . import PipelineError
from .backbones import BackboneSpec, build_backbone
from .distributed import init_distributed, rank_device, shutdown
from .data import ImageFiles, normalize_batch, scan_dataset
from .device_decode import RawBatch, RawFiles, collate_raw, decode_crops
from .preprocess import Preprocess, resolve_decoder
from .progress import Progress
from .runtime import Runtime, default_workers, resolve_device, resolve_runtime


@dataclass
class ExtractConfig:
    data_dir: str
    cache: str
    backbone: str = "resnet18"
    weights: str = "imagenet"
    splits: tuple[str, ...] = ("train", "val")
    views: int = 0  # augmented views per train image
    batch_size: int = 64  # eval mode: features do not depend on it
    workers: int = field(default_factory=default_workers)
    device: str = "auto"
    precision: str = "auto"  # fp32 on CPU, bf16 on CUDA; recorded in the fingerprint
    seed: int = 0  # random init (--weights none) and the views' crops
    force: bool = False
    draft: bool = False  # JPEG draft-mode decoding (faster, slightly different pixels)
    decoder: str = "auto"  # auto: torchvision on CUDA, else pil | pil (workers, the reference) |
    #                        torchvision (JPEGs decoded on the device: nvJPEG); the one used is in the fingerprint
    allow_empty_class: bool = False
    max_skipped: float | None = None  # < 1: fraction of files, >= 1: count


def preprocess_for(cfg: ExtractConfig, device) -> Preprocess:
    """The preprocessing spec of an extract: the tutorial's eval transform, decoded by the decoder that
    cfg.decoder resolves to on this device (auto: torchvision on CUDA, pil elsewhere)."""
    return Preprocess(draft=cfg.draft, decoder=resolve_decoder(cfg.decoder, device.type, cfg.views, cfg.draft))


def feature_fields(backbone_desc: dict, precision: str, views: int, seed: int, draft: bool = False,
                   decoder: str = "pil", spec: Preprocess | None = None) -> dict:
    """Everything that changes a cached feature; the fingerprint is their hash. The preprocessing part
    comes from the spec (default: the tutorial's, with draft and decoder as given)."""
    spec = spec or Preprocess(draft=draft, decoder=decoder)
    return {
        "backbone": backbone_desc["backbone"] if backbone_desc["kind"] == "torchvision" else "program",
        "weights_digest": backbone_desc["weights_digest"],
        "precision": precision,
        "views": views,
        "views_seed": seed if views else None,
        **spec.fingerprint_fields(),  # transform, draft, decoder (absent for pil: older caches stay valid)
    }


def _check_existing(cfg: ExtractConfig, plan: dict, class_names: list[str]):
    """What to do about a file already at cfg.cache, as (state, old cache): 'new' (build it), 'done'
    (complete for these settings and files), 'grown' (same settings, the folder only gained files:
    reuse the old cache's rows). Raises when it differs otherwise and --force was not given."""
    fp, digest = plan["fingerprint"], plan["files_digest"]
    try:
        old = read_attrs(cfg.cache)
    except CacheMissing:
        return "new", None
    except CacheError as e:
        if cfg.force:
            return "new", None
        raise CacheError(f"{e}; or pass --force to replace it") from None
    if cfg.force:
        return "new", None
    if old.get("complete") and old.get("fingerprint") == fp:
        if old.get("files_digest") == digest:
            return "done", None
        cache = read_cache(cfg.cache)
        if _only_gained(cache, plan, class_names):
            return "grown", cache
        raise CacheError(f"cache {cfg.cache} was made from other files of {cfg.data_dir} (some were removed, "
                         "moved or relabelled); pass --force to rebuild it or choose another --cache")
    was = f"{old.get('backbone')}/{old.get('weights')}/{old.get('precision')}/views={old.get('views')}"
    raise CacheError(f"cache {cfg.cache} was made with other settings ({was}: backbone, weights, transforms, "
                     "precision or views differ); pass --force to rebuild it or choose another --cache")


def _only_gained(old, plan: dict, class_names: list[str]) -> bool:
    """True when every file of the old cache is still in the plan with the same label."""
    if old.class_names != class_names or set(old.splits) != set(plan["splits"]):
        return False
    for split, meta in plan["splits"].items():
        new = dict(zip(meta["paths"], meta["labels"]))
        sp = old.splits[split]
        if any(new.get(p) != int(lab) for p, lab in zip(sp.paths, sp.labels)):
            return False
    return True


def seed_from_cache(writer: PartialWriter, old) -> int:
    """Write the rows an older complete cache already has as finished segments; returns how many."""
    reasons_old = dict(old.skipped)
    reused = 0
    for split, meta in writer.plan["splits"].items():
        sp = old.splits[split]
        index = {p: i for i, p in enumerate(sp.paths)}
        known = [p in index or p in reasons_old for p in meta["paths"]]
        j, n = 0, len(known)
        while j < n:
            if not known[j]:
                j += 1
                continue
            k = j
            while k < n and known[k]:
                k += 1
            paths = meta["paths"][j:k]
            rows = [index.get(p, -1) for p in paths]
            feats = np.stack([sp.features[r] if r >= 0 else np.zeros(sp.features.shape[1], np.float32) for r in rows])
            views = None
            if writer.views_of(split):
                views = np.stack([sp.views[r] if r >= 0 else np.zeros(sp.views.shape[1:], np.float32) for r in rows])
            writer.write_segment(split, j, feats, ["" if r >= 0 else reasons_old[p] for r, p in zip(rows, paths)], views)
            reused += k - j
            j = k
    return reused


def _check_skipped(cfg: ExtractConfig, n_skipped: int, n_total: int) -> None:
    if cfg.max_skipped is None or n_total == 0:
        return
    limit = cfg.max_skipped * n_total if cfg.max_skipped < 1 else cfg.max_skipped
    if n_skipped > limit:
        raise PipelineError(f"{n_skipped} of {n_total} files in {cfg.data_dir} are unusable (more than --max-skipped "
                            f"{cfg.max_skipped:g}); fix the folder or raise --max-skipped (finished work is kept)")


@dataclass
class PendingFeatures:
    """(N, D) float32 features on their way to the CPU: on CUDA a non-blocking copy into pinned memory,
    waited for once (wait) when the batch is written, so the next batch's decode and forward are queued
    meanwhile; on the CPU they are simply there."""

    out: torch.Tensor
    copied: object = None  # torch.cuda.Event recorded after the copy, or None

    def wait(self) -> torch.Tensor:
        if self.copied is not None:
            self.copied.synchronize()
        return self.out


def forward_features(model: torch.nn.Module, x: torch.Tensor, rt: Runtime,
                     spec: Preprocess | None = None) -> PendingFeatures:
    """(N, 3, H, W) uint8 crops (normalised here, on the device, as one batch) or normalised floats ->
    pending (N, D) float32 CPU features (.wait() gives them)."""
    with torch.inference_mode(), rt.autocast():
        # the layout is set on the uint8 crops (4x fewer bytes to move); normalising keeps it
        x = x.to(rt.device, non_blocking=True).contiguous(memory_format=rt.memory_format)
        if not x.is_floating_point():
            x = normalize_batch(x, spec or Preprocess())
        y = model(x.contiguous(memory_format=rt.memory_format)).float()
        if rt.device.type != "cuda":
            return PendingFeatures(y.cpu())
        out = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
        out.copy_(y, non_blocking=True)  # queued behind the forward; the CPU goes on to the next batch
    event = torch.cuda.Event()
    event.record()  # on the current stream, after the copy: wait() blocks until the features are there
    return PendingFeatures(out, event)


def prepare_module(module: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    """Move a frozen module to the runtime's device and layout, in eval mode."""
    module = module.to(rt.device).to(memory_format=rt.memory_format)
    if not isinstance(module, torch.fx.GraphModule):  # exported programs keep their export-time mode
        module.eval()
    return module


def plan_batches(writer: PartialWriter, splits: list[str], size: int,
                 shard: dict[str, tuple[int, int]] | None = None) -> list[list[tuple[int, int]]]:
    """Batches of (split number, row) keys covering what no finished segment covers; a batch never
    spans two splits (one batch = one segment). The first batch is small so that the model starts
    while the workers are still filling the pipeline."""
    batches = []
    for g, split in enumerate(splits):
        lo, hi = (shard or {}).get(split, (0, None))
        for a, e in writer.todo(split, lo, hi):
            step = min(size, 8) if not batches else size
            s = a
            while s < e:
                batches.append([(g, r) for r in range(s, min(s + step, e))])
                s += step
                step = size
    return batches


def _worker_batch(batch):
    """A batch the workers cropped: (split number, first row, good uint8 crops, their views, reasons)."""
    x, v, g, idx, reasons = batch
    good = [r == "" for r in reasons]
    if not all(good):  # the usual batch has no bad file and needs no copy
        mask = torch.tensor(good)
        x, v = x[mask], v[mask]
    return int(g[0]), int(idx[0]), x, v, list(reasons)


def _device_batch(batch: RawBatch, device, spec: Preprocess):
    """A batch of raw JPEG bytes (and odd files' pixels): decoded, resized and cropped on the device."""
    x, reasons = decode_crops(batch.items(), device, spec)
    return batch.group, batch.start, x, None, reasons


@dataclass
class _InFlight:
    """A batch whose forward has been queued; written to its segment once its features reach the CPU."""

    split: str
    start: int
    reasons: list[str]
    feats: PendingFeatures | None
    views: PendingFeatures | None
    k: int  # views per image


def _write_batch(writer: PartialWriter, b: _InFlight, dim: int) -> int:
    """Wait for a batch's features and write its segment (bad files: zero rows); returns its size."""
    ok = torch.tensor([r == "" for r in b.reasons])
    feats = torch.zeros(len(b.reasons), dim)
    vfeats = torch.zeros(len(b.reasons), b.k, dim) if b.k else None
    if b.feats is not None:
        feats[ok] = b.feats.wait()
        if b.k:
            vfeats[ok] = b.views.wait().view(-1, b.k, dim)
    writer.write_segment(b.split, b.start, feats.numpy(), b.reasons, vfeats.numpy() if b.k else None)
    return len(b.reasons)


def extract_rows(writer: PartialWriter, data, model, rt: Runtime, cfg: ExtractConfig, progress: Progress,
                 shard: dict[str, tuple[int, int]] | None = None, whole_job: PartialWriter | None = None) -> int:
    """Extract every unfinished row (of shard, when given) through one DataLoader; one segment per batch.

    Workers ship uint8 crops (PIL path) or raw bytes (device path); normalisation is one batched op on
    the device. A batch's segment is written after the next batch's forward is queued, so on CUDA the
    copy of its features to the CPU overlaps the next decode and forward (one sync per batch)."""
    splits = list(data.splits)
    batches = plan_batches(writer, splits, cfg.batch_size, shard)
    if not batches:
        return 0
    spec = preprocess_for(cfg, rt.device)
    groups = [([str(data.root / p) for p in data.splits[s].paths], data.splits[s].paths, writer.views_of(s))
              for s in splits]
    on_device = spec.decoder == "torchvision"
    if on_device:
        ds, collate = RawFiles(groups, spec.exif), collate_raw
    else:
        ds, collate = ImageFiles(groups, spec, seed=cfg.seed), None
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=cfg.workers, collate_fn=collate,
                                         pin_memory=rt.pin_memory and not on_device,
                                         prefetch_factor=4 if cfg.workers else None)
    done, in_flight = 0, None

    def write(b: _InFlight) -> None:
        nonlocal done
        done += _write_batch(writer, b, model.feature_dim)
        if whole_job is not None:
            progress.set(sum(whole_job.done_files(s) for s in splits))
        else:
            progress.update(len(b.reasons))

    try:
        for batch in loader:
            g, start, x, v, reasons = _device_batch(batch, rt.device, spec) if on_device else _worker_batch(batch)
            k = writer.views_of(splits[g])
            feats = views = None
            if len(x):
                feats = forward_features(model, x, rt, spec)
                if k:
                    views = forward_features(model, v.flatten(0, 1), rt, spec)
            queued, in_flight = in_flight, _InFlight(splits[g], start, reasons, feats, views, k)
            if queued is not None:
                write(queued)
    finally:  # also on an error or Ctrl-C in the next batch: a batch already computed is kept
        if in_flight is not None:
            write(in_flight)
    return done


def plan_extraction(cfg: ExtractConfig):
    """Scan the data, build the backbone, and compute the plan of the cache (pure of disk writes)."""
    if cfg.views < 0:
        raise PipelineError("--views must be >= 0")
    spec = preprocess_for(cfg, resolve_device(cfg.device))  # checks --decoder early; auto resolved here
    data = scan_dataset(cfg.data_dir, list(cfg.splits), cfg.allow_empty_class)
    rt = resolve_runtime(cfg.device, cfg.precision)
    bb = build_backbone(BackboneSpec(cfg.backbone, cfg.weights, cfg.seed))
    model = prepare_module(bb.module, rt)
    model.feature_dim = bb.feature_dim
    fields = feature_fields(bb.description, rt.precision, cfg.views, cfg.seed, spec=spec)
    fp = fingerprint(fields)
    splits = {s: (sp.paths, sp.labels) for s, sp in data.splits.items()}
    digest = files_digest(data.class_names, splits)
    plan = {"fingerprint": fp, "files_digest": digest, "feature_dim": bb.feature_dim, "views": cfg.views,
            "views_split": views_split(data),
            "splits": {s: {"paths": p, "labels": lab} for s, (p, lab) in splits.items()}}
    attrs = {
        "format": FORMAT, "fingerprint": fp, "files_digest": digest,
        "backbone": bb.description["backbone"], "weights": bb.description["weights"],
        "backbone_spec": json.dumps(bb.description), "feature_dim": bb.feature_dim,
        "class_names": json.dumps(data.class_names), "transform": json.dumps(spec.record()),
        "precision": rt.precision, "views": cfg.views, "seed": cfg.seed, "draft": cfg.draft,
        "decoder": spec.decoder,  # the decoder actually used (auto resolved)
        "config": json.dumps({k: v for k, v in asdict(cfg).items() if k not in ("force",)}, default=list),
        "torch": torch.__version__,
    }
    return data, rt, model, plan, attrs


def views_split(data) -> str:
    return next(iter(data.splits))  # the first split (train) carries the augmented views


def _prepare_on_main(cfg: ExtractConfig, data, plan: dict, stack: contextlib.ExitStack):
    """Rank 0 (or the only process): lock, decide, open the partial folder. Returns (state, writer, reused)."""
    stack.enter_context(CacheLock(cfg.cache))
    state, old = _check_existing(cfg, plan, data.class_names)
    if state == "done":
        return state, None, 0
    writer = PartialWriter(cfg.cache, plan).open()
    reused = seed_from_cache(writer, old) if state == "grown" and not writer.segments() else 0
    return state, writer, reused


def extract(cfg: ExtractConfig, progress: Progress | None = None) -> dict:
    """Fill cfg.cache from cfg.data_dir; resumes an interrupted run. Returns the summary dict.

    Under torchrun every rank extracts its contiguous share of each split into the shared
    CACHE.partial/ folder; after a barrier rank 0 assembles the one cache (identical to a
    single-process run) and only rank 0's summary counts.
    """
    d = init_distributed(cfg.device)
    try:
        return _extract(cfg, progress or Progress(), d)
    finally:
        shutdown(d)  # a process group left to the interpreter's exit can abort (SIGABRT) under gloo


def _extract(cfg: ExtractConfig, progress: Progress, d) -> dict:
    t0 = time.perf_counter()
    cfg = replace(cfg, device=rank_device(cfg.device, d))
    data, rt, model, plan, attrs = plan_extraction(cfg)
    if len({(fp, dg) for fp, dg in d.all_gather((plan["fingerprint"], plan["files_digest"]))}) > 1:
        raise PipelineError("the ranks see different files or settings; run every rank on the same DATA_DIR and flags")
    scan_skipped = sorted(s for sp in data.splits.values() for s in sp.skipped)
    with contextlib.ExitStack() as stack:
        outcome = ("ok", None, 0)
        if d.is_main:
            try:
                state, writer, reused = _prepare_on_main(cfg, data, plan, stack)
                outcome = (state, None, reused)
            except (CacheError, PipelineError) as e:
                outcome = ("error", str(e), 0)
        state, message, reused = d.broadcast(outcome)
        if state == "error":
            raise CacheError(message) if d.is_main else PipelineError(f"rank 0 stopped: {message}")
        if state == "done":
            return summarize(cfg, data, scan_skipped, {}, 0, time.perf_counter() - t0, up_to_date=True)
        if not d.is_main:
            writer = PartialWriter(cfg.cache, plan).join()
        already = sum(writer.done_files(s) for s in data.splits) - reused
        total = sum(len(sp) for sp in data.splits.values())
        progress.start(total, "extract")
        progress.update(already + reused)
        shard = {s: d.shard(len(sp)) for s, sp in data.splits.items()} if d.enabled else None
        whole_job = writer if d.enabled and d.is_main else None  # rank 0's bar counts every rank's batches
        computed = extract_rows(writer, data, model, rt, cfg, progress, shard, whole_job)
        computed = int(sum(d.all_gather(computed)))  # also the barrier: every shard is written
        progress.close()
        if not d.is_main:
            return summarize(cfg, data, [], {}, computed, time.perf_counter() - t0, resumed=already)
        n_decode_bad = sum(int((np.load(s.path)["ok"] == 0).sum()) for s in writer.segments())
        _check_skipped(cfg, len(scan_skipped) + n_decode_bad, total + len(scan_skipped))
        result = writer.finalize(attrs, scan_skipped)
    return summarize(cfg, data, result["skipped"], result["rows"], computed, time.perf_counter() - t0,
                     resumed=already, discarded=writer.discarded, reused=reused)


def summarize(cfg, data, skipped, rows, computed, seconds, up_to_date=False, resumed=0, discarded="",
              reused=0) -> dict:
    return {
        "cache": str(cfg.cache), "class_names": data.class_names, "rows": rows,
        "skipped": [list(s) for s in skipped], "computed": computed, "resumed": resumed,
        "seconds": seconds, "images_per_s": computed / seconds if seconds > 0 else 0.0,
        "up_to_date": up_to_date, "discarded": discarded, "reused": reused,
    }


def summary_line(s: dict) -> str:
    if s["up_to_date"]:
        return f"cache {s['cache']} is already complete for these settings and files; nothing to do"
    rows = ", ".join(f"{k} {v}" for k, v in s["rows"].items())
    line = (f"extracted {rows} | skipped {len(s['skipped'])} | {s['seconds']:.1f} s | "
            f"{s['images_per_s']:.1f} images/s -> {s['cache']}")
    if s["resumed"]:
        line += f" (resumed: {s['resumed']} images were already done)"
    if s["reused"]:
        line += f" (the folder only gained files: {s['reused']} rows reused from the existing cache, {s['computed']} new)"
    if s["discarded"]:
        line += f" (discarded {s['discarded']})"
    return line
