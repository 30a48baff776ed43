"""Extraction: run the frozen backbone once per image (and per augmented view) into the feature cache."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cache import CacheError, CacheMismatch, read_attrs
from cache.attrs import CacheAttrs
from cache.plan import ExtractionPlan, SplitPlan
from cache.reuse import Decision, Reuse, decide, sha256_or_empty
from cache.store import RESERVED, CacheLock, PartialWriter, fingerprint

from . import PipelineError
from .backbones import BackboneSpec, build_backbone
from .distributed import init_distributed, rank_device, shutdown
from .data import ImageFiles, check_usable_classes, normalize_batch, scan_dataset
from .device_decode import Decoded, DeviceDecoder, RawBatch, RawFiles, collate_raw
from .image_stats import FIELDS as STAT_FIELDS
from .image_stats import as_rows
from .preprocess import JPEG_DECODES, Preprocess, decode_hint, decode_mode, jpeg_draft, resolve_decoder
from .progress import Progress
from .splits import SplitSpec
from .runtime import Runtime, default_workers, resolve_device, resolve_runtime
from .text import printable


@dataclass
class ExtractConfig:
    data_dir: str
    cache: str
    backbone: str = "resnet18"
    weights: str = "imagenet"
    splits: tuple[str, ...] = ("train", "val")
    views: int = 0  # augmented views per train image
    batch_size: int | None = None  # eval mode: features do not depend on it (None: default_batch_size)
    workers: int = field(default_factory=default_workers)
    device: str = "auto"
    precision: str = "auto"  # fp32 on CPU, bf16 on CUDA; recorded in the fingerprint
    seed: int = 0  # random init (--weights none) and the views' crops
    force: bool = False
    jpeg_decode: str = "auto"  # auto: fast on the pil decoder, full size on torchvision | fast | exact | draft
    draft: bool = False  # the old --draft: the same as jpeg_decode "draft"
    decoder: str = "auto"  # auto: torchvision on CUDA, else pil | pil (workers, the reference) |
    #                        torchvision (JPEGs decoded on the device: nvJPEG); the one used is in the fingerprint
    allow_empty_class: bool = False
    max_skipped: float | None = None  # < 1: fraction of files, >= 1: count
    val_fraction: float | None = None  # flat folders only (None: splits.DEFAULT_VAL_FRACTION)
    test_fraction: float | None = None  # flat folders only (None: no test split)
    split_seed: int = 0  # flat folders only: which files go to val/test
    reuse: tuple[str, ...] = ()  # other caches of the same settings whose rows are reused by content


def default_batch_size(device) -> int:
    """The inference batch when --batch-size is not given: 64 on the CPU, 256 on CUDA (a GPU forward of 64
    crops is too short to hide the per-batch costs; 256 uint8 crops are 38 MB)."""
    return 256 if torch.device(device).type == "cuda" else 64


def preprocess_for(cfg: ExtractConfig, device) -> Preprocess:
    """The preprocessing spec of an extract: the tutorial's eval transform (or the one the backbone's weights
    ask for: a torchvision weights version's preset, a timm model's data config), decoded by the decoder
    that cfg.decoder resolves to on this device (auto: torchvision on CUDA, pil elsewhere), JPEGs at the DCT
    scale of cfg.jpeg_decode (auto: fast on the pil decoder)."""
    from .backbones import preprocess_preset

    mode = cfg.jpeg_decode
    if cfg.draft:
        if mode not in ("auto", "draft"):
            raise PipelineError(f"--draft is --jpeg-decode draft; it cannot go with --jpeg-decode {mode}")
        mode = "draft"
    decoder = resolve_decoder(cfg.decoder, device.type, cfg.views, draft=mode in ("fast", "draft"))
    return Preprocess(**preprocess_preset(cfg.backbone, cfg.weights), draft=jpeg_draft(mode, decoder), decoder=decoder)


def feature_fields(backbone_desc: dict, precision: str, views: int, seed: int, draft: int = 0,
                   decoder: str = "pil", spec: Preprocess | None = None) -> dict:
    """Everything that changes a cached feature; the fingerprint is their hash. The preprocessing part
    comes from the spec (default: the tutorial's, with draft margin and decoder as given)."""
    spec = spec or Preprocess(draft=draft, decoder=decoder)
    return {
        "backbone": backbone_desc["backbone"] if backbone_desc["kind"] in ("torchvision", "timm") else "program",
        "weights_digest": backbone_desc["weights_digest"],
        "precision": precision,
        "views": views,
        "views_seed": seed if views else None,
        # a photo's views are drawn from (seed, its content's sha256), so they follow it to any path or split
        **({"views_drawn_from": "content"} if views else {}),
        **spec.fingerprint_fields(),  # transform, draft, decoder (absent for pil: older caches stay valid)
    }


SEED_ROWS = 2048  # rows per segment of reused rows: bounds the memory of one write


def _runs(rows: list, lo: int, hi: int):
    """(start, stop) of each run of consecutive non-None rows in [lo, hi), at most SEED_ROWS long."""
    j = lo
    while j < hi:
        if rows[j] is None:
            j += 1
            continue
        e = j
        while e < hi and rows[e] is not None and e - j < SEED_ROWS:
            e += 1
        yield j, e
        j = e


def _source_rows(reuse: Reuse, run: list, k: int, dim: int):
    """Features, views (k > 0) and measures of the Known rows of run, gathered from their source caches
    (one indexed copy per source split)."""
    feats = np.zeros((len(run), dim), np.float32)
    views = np.zeros((len(run), k, dim), np.float32) if k else None
    stats = np.full((len(run), len(STAT_FIELDS)), np.nan, np.float32)  # rows made before the measures: NaN
    groups: dict[tuple[int, str], tuple[list[int], list[int]]] = {}
    for i, o in enumerate(run):
        if o.row >= 0:
            dst, src = groups.setdefault((o.source, o.split), ([], []))
            dst.append(i)
            src.append(o.row)
    for (source, split), (dst, src) in groups.items():
        sp = reuse.sources[source].splits[split]
        feats[dst] = sp.features[src]
        if k:
            views[dst] = sp.views[src]
        if sp.image_stats is not None:
            stats[dst] = as_rows(sp.image_stats[src])
    return feats, views, stats


def seed_from_cache(writer: PartialWriter, reuse: Reuse) -> int:
    """Write the rows reuse found in the caches as finished segments (runs of consecutive rows that no
    segment covers yet: a rerun after a kill seeds what the killed run had not); returns how many."""
    reused = 0
    for split, rows in reuse.rows.items():
        k = writer.views_of(split)
        for lo, hi in writer.todo(split):
            for j, e in _runs(rows, lo, hi):
                run = rows[j:e]
                feats, views, stats = _source_rows(reuse, run, k, writer.plan.feature_dim)
                writer.write_segment(split, j, feats, [o.reason if o.row < 0 else "" for o in run], views,
                                     digests=[o.sha256 for o in run], stats=stats)
                reused += e - j
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


class _Hashed(torch.utils.data.Dataset):
    """ImageFiles' items with the sha256 of their file, computed in the worker (not on the main process's
    critical path) before the decode, which then reads the file from the page cache; the views of an image
    are drawn from its sha256, so they are the same under any path, in any split, in any cache."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        g, i = key
        digest = sha256_or_empty(Path(self.ds.groups[g][0][i]))
        return (*self.ds.item(key, view_key=digest), digest)


def _worker_batch(batch):
    """A batch the workers cropped: (split number, first row, good uint8 crops, their views, reasons, sha256s,
    the images' measures (N, image_stats.FIELDS))."""
    x, v, g, idx, reasons, stats, digests = batch
    good = [r == "" for r in reasons]
    if not all(good):  # the usual batch has no bad file and needs no copy
        mask = torch.tensor(good)
        x, v = x[mask], v[mask]
    return int(g[0]), int(idx[0]), x, v, list(reasons), list(digests), stats.numpy()


def _decoded_ahead(loader, decoder: DeviceDecoder):
    """(RawBatch, Decoded) in order; batch n+1 is decoded on a background thread (the decode ops release
    the GIL) while the caller queues batch n's forward: two batches in flight, no more."""
    from concurrent.futures import ThreadPoolExecutor

    from . import device_decode

    if device_decode.SYNC_EACH_DECODE:  # the race check's reference: nothing queued while a decode allocates
        for batch in loader:
            yield batch, decoder(batch.items())
        return
    with ThreadPoolExecutor(1, thread_name_prefix="tlearn-decode") as pool:
        pending = None
        for batch in loader:
            job = (batch, pool.submit(decoder, batch.items()))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = job
        if pending is not None:
            yield pending[0], pending[1].result()


def _device_batches(loader, decoder: DeviceDecoder):
    """Device path: (split number, first row, crops on the device, no views, reasons, sha256s) per batch."""
    for batch, dec in _decoded_ahead(loader, decoder):
        batch: RawBatch
        dec: Decoded
        yield batch.group, batch.start, dec.take(), None, dec.reasons, batch.digests, None  # not measured


@dataclass
class _InFlight:
    """A batch whose forward has been queued; written to its segment once its features reach the CPU."""

    split: str
    start: int
    reasons: list[str]
    feats: PendingFeatures | None
    views: PendingFeatures | None
    k: int  # views per image
    digests: list[str] | None = None  # the files' sha256s when the workers hashed them
    stats: np.ndarray | None = None  # (N, image_stats.FIELDS) measures when the workers took them


class BackgroundWrites:
    """Segments written on one thread, in order, while the next batches are decoded and run: waiting for
    a batch's features (on CUDA), np.savez and the fsync leave the critical path. At most `depth`
    batches wait; a writer's error is raised in the caller at its next submit or at close."""

    def __init__(self, fn: Callable[[_InFlight], None], depth: int = 2):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.fn, self.depth = fn, depth
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="tlearn-write")
        self.pending = deque()

    def submit(self, b: _InFlight) -> None:
        self.pending.append(self.pool.submit(self.fn, b))
        while self.pending and (len(self.pending) > self.depth or self.pending[0].done()):
            self.pending.popleft().result()

    def close(self) -> None:
        """Wait for every submitted write (all are attempted); raise the first writer error."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True)


def _write_batch(writer: PartialWriter, b: _InFlight, dim: int) -> int:
    """Wait for a batch's features and write its segment (bad files: zero rows); returns its size."""
    ok = torch.tensor([r == "" for r in b.reasons])
    feats = torch.zeros(len(b.reasons), dim)
    vfeats = torch.zeros(len(b.reasons), b.k, dim) if b.k else None
    if b.feats is not None:
        feats[ok] = b.feats.wait()
        if b.k:
            vfeats[ok] = b.views.wait().view(-1, b.k, dim)
    writer.write_segment(b.split, b.start, feats.numpy(), b.reasons, vfeats.numpy() if b.k else None,
                         digests=b.digests, stats=b.stats)
    return len(b.reasons)


def extract_rows(writer: PartialWriter, data, model, rt: Runtime, cfg: ExtractConfig, progress: Progress,
                 shard: dict[str, tuple[int, int]] | None = None, whole_job: PartialWriter | None = None) -> int:
    """Extract every unfinished row (of shard, when given) through one DataLoader; one segment per batch.

    Workers ship uint8 crops (PIL path) or raw bytes (device path); normalisation is one batched op on
    the device. A batch's segment is written on a writer thread (BackgroundWrites), so on CUDA the copy
    of its features to the CPU, the wait for them and the write overlap the next decode and forward."""
    splits = list(data.splits)
    batches = plan_batches(writer, splits, cfg.batch_size or default_batch_size(rt.device), shard)
    if not batches:
        return 0
    spec = preprocess_for(cfg, rt.device)
    groups = [([str(data.root / p) for p in data.splits[s].paths], data.splits[s].paths, writer.views_of(s))
              for s in splits]
    on_device = spec.decoder == "torchvision"
    if on_device:
        ds, collate = RawFiles(groups, spec), collate_raw
    else:
        ds, collate = _Hashed(ImageFiles(groups, spec, seed=cfg.seed)), None
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=cfg.workers, collate_fn=collate,
                                         pin_memory=rt.pin_memory and not on_device,
                                         prefetch_factor=4 if cfg.workers else None)
    done = 0

    def write(b: _InFlight) -> None:  # on the writer thread, one batch after the other
        nonlocal done
        done += _write_batch(writer, b, writer.plan.feature_dim)
        if whole_job is not None:
            progress.set(sum(whole_job.done_files(s) for s in splits))
        else:
            progress.update(len(b.reasons))

    feed = contextlib.closing(_device_batches(loader, DeviceDecoder(rt.device, spec)) if on_device
                              else (_worker_batch(b) for b in loader))
    writes = BackgroundWrites(write)
    try:
        with feed as stream:
            for g, start, x, v, reasons, digests, stats in stream:
                k = writer.views_of(splits[g])
                feats = views = None
                if len(x):
                    feats = forward_features(model, x, rt, spec)
                    if k:
                        views = forward_features(model, v.flatten(0, 1), rt, spec)
                writes.submit(_InFlight(splits[g], start, reasons, feats, views, k, digests, stats))
    finally:  # also on an error or Ctrl-C in the next batch: every batch already computed is written
        writes.close()
    return done


SEED_MAX = 2**32 - 1  # view seeds are seed * 1_000_003 + crc32(name): within torch's 64-bit seed range


def check_split_names(splits) -> None:
    """Each split is one plain sub-folder of DATA_DIR (its name also names cache groups and segment files)."""
    seen = set()
    for s in splits:
        plain = s and s not in (".", "..") and "/" not in s and "\\" not in s and not s.startswith(".") \
            and printable(s) == s
        if not plain:
            raise PipelineError(f"--splits: {printable(s)!r} is not a sub-folder name of DATA_DIR "
                                "(no '/', '..', leading '.' or control characters)")
        if s in RESERVED:
            raise PipelineError(f"--splits: a split cannot be called {s!r} (the cache uses /{s}); rename the folder")
        if s in seen:
            raise PipelineError(f"--splits: {s!r} is named twice")
        seen.add(s)


def check_config(cfg: ExtractConfig) -> None:
    """Options that would fail (or write outside the cache's folders) later: one line each, before any work."""
    if cfg.views < 0:
        raise PipelineError("--views must be >= 0")
    if not 0 <= cfg.seed <= SEED_MAX:
        raise PipelineError(f"--seed must be from 0 to {SEED_MAX}, got {cfg.seed}")
    check_split_names(cfg.splits)


@dataclass
class Extraction:
    """Everything an extract needs, decided before anything is written."""

    data: object  # pipeline.data.ScannedData
    rt: Runtime
    model: torch.nn.Module
    plan: ExtractionPlan
    attrs: CacheAttrs  # the cache's root attributes


def _tool_files(cfg: ExtractConfig, root: Path) -> set[str]:
    """The cache's own files, as paths relative to the data folder, for a cache written inside it."""
    cache = Path(cfg.cache).resolve()
    names = (cache, cache.with_name(cache.name + ".lock"))
    out = set()
    for n in names:
        with contextlib.suppress(ValueError):
            out.add(n.relative_to(root.resolve()).as_posix())
    return out


def plan_extraction(cfg: ExtractConfig) -> Extraction:
    """Scan the data, build the backbone, and compute the plan of the cache (pure of disk writes)."""
    check_config(cfg)
    spec = preprocess_for(cfg, resolve_device(cfg.device))  # checks --decoder early; auto resolved here
    data = scan_dataset(cfg.data_dir, list(cfg.splits), cfg.allow_empty_class, cfg.val_fraction, cfg.test_fraction,
                        cfg.split_seed)
    own = _tool_files(cfg, data.root)
    for sp in data.splits.values():
        sp.skipped = [s for s in sp.skipped if s[0] not in own]
    rt = resolve_runtime(cfg.device, cfg.precision)
    bb = build_backbone(BackboneSpec(cfg.backbone, cfg.weights, cfg.seed))
    model = prepare_module(bb.module, rt)
    fields = feature_fields(bb.description, rt.precision, cfg.views, cfg.seed, spec=spec)
    plan = ExtractionPlan(
        fingerprint=fingerprint(fields), feature_dim=bb.feature_dim, views=cfg.views, views_split=views_split(data),
        class_names=list(data.class_names), root=str(Path(data.root).resolve()),
        splits={s: SplitPlan(list(sp.paths), list(sp.labels), list(sp.sizes), list(sp.mtimes))
                for s, sp in data.splits.items()})
    attrs = CacheAttrs(
        fingerprint=plan.fingerprint, files_digest=plan.files_digest,
        backbone=bb.description["backbone"], weights=bb.description["weights"],
        backbone_spec=bb.description, feature_dim=bb.feature_dim, class_names=tuple(data.class_names),
        transform=spec.record(), precision=rt.precision, views=cfg.views, seed=cfg.seed,
        draft=bool(spec.draft),  # whether JPEGs were drafted; the margin is in transform's spec
        decoder=spec.decoder,  # the decoder actually used (auto resolved)
        split=data.split_record(),
        data_root=plan.root,  # absolute: which folder this is, whatever folder extract ran from
        config={k: v for k, v in asdict(cfg).items() if k not in ("force", "reuse")},  # not what the cache holds
        torch=torch.__version__)
    return Extraction(data, rt, model, plan, attrs)


def views_split(data) -> str:
    return next(iter(data.splits))  # the first split (train) carries the augmented views


@dataclass(frozen=True)
class MainOutcome:
    """Rank 0's decision, broadcast to every rank: a decision, or the error that stopped it."""

    decision: Decision | None = None
    reused: int = 0  # rows seeded from caches by this run
    changed: int = 0
    error: Exception | None = None
    update: dict | None = None  # an update's counts (update_counts)


def update_counts(reuse: Reuse) -> dict:
    """What an update found, by name (the summary line's words)."""
    keys = ("new", "changed", "relabelled", "renamed", "resplit", "dropped", "hashed",
            "classes_added", "classes_removed")
    return {"reused": reuse.reused, **{k: getattr(reuse, k) for k in keys}}


def _prepare_on_main(cfg: ExtractConfig, plan: ExtractionPlan, stack: contextlib.ExitStack,
                     split: SplitSpec = SplitSpec()):
    """Rank 0 (or the only process): lock, decide, open the partial folder. Returns (outcome, writer)."""
    stack.enter_context(CacheLock(cfg.cache))
    d = decide(cfg.cache, plan, split, cfg.force, tuple(cfg.reuse))
    if d.decision is Decision.DONE:
        return MainOutcome(d.decision), None
    writer = PartialWriter(cfg.cache, plan).open()
    if d.decision is not Decision.UPDATE:
        return MainOutcome(d.decision), writer
    reused = seed_from_cache(writer, d.reuse)
    return MainOutcome(d.decision, reused, d.reuse.changed, update=update_counts(d.reuse)), writer


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


def _decode_mismatch(cfg: ExtractConfig, ex: Extraction) -> str:
    """The reason, when the cache at cfg.cache was made with these very settings but another JPEG decode
    (a cache made before fast decoding became the default, say); '' otherwise."""
    with contextlib.suppress(CacheError, PipelineError, OSError, KeyError, TypeError, ValueError):
        old = read_attrs(cfg.cache)
        was = Preprocess.from_record(old.transform, old.draft, old.decoder).draft
        spec = Preprocess.from_json(ex.attrs.transform["spec"])
        fields = feature_fields(ex.attrs.backbone_spec, ex.rt.precision, cfg.views, cfg.seed, spec=replace(spec, draft=was))
        if was != spec.draft and fingerprint(fields) == old.fingerprint:
            return decode_hint(was, spec.draft)
    return ""


def follow_cache_decode(cfg: ExtractConfig) -> ExtractConfig:
    """--jpeg-decode auto on an existing pil cache: the JPEG decode it was made with (exact, for a cache made
    before fast decoding became the default), so its rows stay one decode and an update needs no --force;
    a new cache (or --force) gets fast. An explicit --jpeg-decode is kept (and refused if it differs)."""
    if cfg.jpeg_decode != "auto" or cfg.draft or cfg.force or not os.path.isfile(cfg.cache):
        return cfg
    with contextlib.suppress(CacheError, PipelineError, OSError, KeyError, TypeError, ValueError):
        old = read_attrs(cfg.cache)
        was = Preprocess.from_record(old.transform, old.draft, old.decoder)
        if was.decoder == "pil" and was.draft in JPEG_DECODES.values():
            return replace(cfg, jpeg_decode=decode_mode(was.draft))
    return cfg


def _extract(cfg: ExtractConfig, progress: Progress, d) -> dict:
    t0 = time.perf_counter()
    cfg = follow_cache_decode(replace(cfg, device=rank_device(cfg.device, d)))
    ex = plan_extraction(cfg)
    data, plan = ex.data, ex.plan
    if len({(fp, dg) for fp, dg in d.all_gather((plan.fingerprint, plan.files_digest))}) > 1:
        raise PipelineError("the ranks see different files or settings; run every rank on the same DATA_DIR and flags")
    scan_skipped = sorted(s for sp in data.splits.values() for s in sp.skipped)
    with contextlib.ExitStack() as stack:
        outcome, writer = MainOutcome(), None
        if d.is_main:
            try:
                outcome, writer = _prepare_on_main(cfg, plan, stack, data.split)
            except (CacheError, PipelineError) as e:
                hint = _decode_mismatch(cfg, ex) if isinstance(e, CacheMismatch) else ""
                outcome = MainOutcome(error=CacheMismatch(f"cache {cfg.cache}: {hint}") if hint else e)
        outcome = d.broadcast(outcome)
        if outcome.error is not None:
            if d.is_main:
                raise outcome.error
            raise PipelineError(f"rank 0 stopped: {outcome.error}")
        if outcome.decision is Decision.DONE:
            return summarize(cfg, data, scan_skipped, {}, 0, time.perf_counter() - t0, up_to_date=True)
        if not d.is_main:
            writer = PartialWriter(cfg.cache, plan).join()
        reused = outcome.reused
        already = sum(writer.done_files(s) for s in data.splits) - reused  # segments of a killed run
        total = sum(len(sp) for sp in data.splits.values())
        progress.start(total, "extract")
        progress.update(already + reused)
        shard = {s: d.shard(len(sp)) for s, sp in data.splits.items()} if d.enabled else None
        whole_job = writer if d.enabled and d.is_main else None  # rank 0's bar counts every rank's batches
        computed = extract_rows(writer, data, ex.model, ex.rt, cfg, progress, shard, whole_job)
        computed = int(sum(d.all_gather(computed)))  # also the barrier: every shard is written
        progress.close()
        if not d.is_main:
            return summarize(cfg, data, [], {}, computed, time.perf_counter() - t0, resumed=already)
        n_decode_bad = sum(int((np.load(s.path)["ok"] == 0).sum()) for s in writer.segments())
        _check_skipped(cfg, len(scan_skipped) + n_decode_bad, total + len(scan_skipped))
        _check_decoded_classes(cfg, data, writer)
        result = writer.finalize(ex.attrs, scan_skipped)
    return summarize(cfg, data, result["skipped"], result["rows"], computed, time.perf_counter() - t0,
                     resumed=already, discarded=writer.discarded, reused=reused, changed=outcome.changed,
                     update=outcome.update)


def _check_decoded_classes(cfg: ExtractConfig, data, writer: PartialWriter) -> None:
    """A class whose train files all failed to decode is refused as an empty class is (finished work is kept:
    the rerun with --allow-empty-class only assembles)."""
    first = views_split(data)
    sp = data.splits[first]
    reasons = np.concatenate([np.load(s.path)["reasons"] for s in writer.segments(first)])
    check_usable_classes(data, [y for y, r in zip(sp.labels, reasons) if not r],
                         [(p, str(r)) for p, r in zip(sp.paths, reasons) if r], cfg.allow_empty_class)


def summarize(cfg, data, skipped, rows, computed, seconds, up_to_date=False, resumed=0, discarded="",
              reused=0, changed=0, update=None) -> dict:
    return {
        "cache": str(cfg.cache), "class_names": data.class_names, "rows": rows,
        "skipped": [list(s) for s in skipped], "computed": computed, "resumed": resumed,
        "seconds": seconds, "images_per_s": computed / seconds if seconds > 0 else 0.0,
        "up_to_date": up_to_date, "discarded": discarded, "reused": reused, "changed": changed,
        "update": update,  # an update's counts (update_counts), None for a build
    }


def update_words(u: dict) -> str:
    """An update's counts as the summary line says them: reused 385 | new 10 | relabelled 12 | ..."""
    parts = [f"reused {u['reused']}", f"new {u['new']}" + (f" ({u['changed']} changed)" if u["changed"] else "")]
    parts += [f"{word} {u[k]}" for k, word in (("relabelled", "relabelled"), ("renamed", "renamed"),
                                              ("resplit", "moved split"), ("dropped", "dropped")) if u[k]]
    classes = [f"+{printable(c)}" for c in u["classes_added"]] + [f"-{printable(c)}" for c in u["classes_removed"]]
    if classes:
        parts.append("classes " + " ".join(classes))
    return " | ".join(parts)


def summary_line(s: dict) -> str:
    if s["up_to_date"]:
        return f"cache {s['cache']} is already complete for these settings and files; nothing to do"
    rows = ", ".join(f"{k} {v}" for k, v in s["rows"].items())
    if s.get("update"):
        line = (f"updated {rows} | {update_words(s['update'])} | skipped {len(s['skipped'])} | "
                f"{s['seconds']:.1f} s -> {s['cache']}")
    else:
        line = (f"extracted {rows} | skipped {len(s['skipped'])} | {s['seconds']:.1f} s | "
                f"{s['images_per_s']:.1f} images/s -> {s['cache']}")
    if s["resumed"]:
        line += f" (resumed: {s['resumed']} images were already done)"
    if s["discarded"]:
        line += f" (discarded {s['discarded']})"
    return line
