"""First checks of the device (nvJPEG) decode path, run by benchmarks/gpu_first_checks.sh.

    python benchmarks/device_checks.py cases  [--device cuda|cpu]
    python benchmarks/device_checks.py race   [--device cuda|cpu] [--images N] [--batch-size B]
    python benchmarks/device_checks.py syncs  [--device cuda|cpu] [--batches 5] [--batch-size B]
    python benchmarks/device_checks.py stages [--device cuda|cpu] [--batches 20] [--batch-size B] [--data DIR]

cases:  odd JPEGs (EXIF 6/8, CMYK, grayscale, progressive, truncated, 1x1, baseline) through the device
        path vs the PIL path: the route each takes, max/mean pixel difference, and what the raw device
        decoder makes of each when nothing routes it (for the record).
race:   one folder of large photo-like JPEGs of many sizes extracted three ways in one process: a full
        synchronize before each decode (the reference), the dedicated decode stream (the tool), and the
        old way (decode on the forward's stream, no sync); features compared with the reference.
syncs:  torch.cuda.set_sync_debug_mode("warn") over N device-path batches: each distinct sync reported.
stages: per-stage host times over N batches (worker wait, decode, forward queued, write) and the
        images/s, with the stages run in order (decode thread off) and each ended by a synchronize.
--device cpu runs every check on the CPU (a dry run: it proves the script, measures nothing).
Each prints lines starting with 'CHECK' (PASS/FAIL/INFO) that the shell script collects.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline.device_decode as dd  # noqa: E402
from pipeline.data import BadImage, load_rgb, uint8_transform  # noqa: E402
from pipeline.preprocess import Preprocess  # noqa: E402

SPEC = Preprocess(decoder="torchvision")


def report(status: str, name: str, detail: str) -> None:
    print(f"CHECK {status} {name}: {detail}", flush=True)


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.empty((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    arr[..., 2] = rng.integers(0, 255, (h, w), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def odd_jpegs(folder: Path) -> dict[str, Path]:
    img = _photo(640, 480, 0)
    out = {}
    for tag in (6, 8):
        exif = Image.Exif()
        exif[dd.EXIF_ORIENTATION] = tag
        img.save(out.setdefault(f"exif{tag}", folder / f"exif{tag}.jpg"), exif=exif.tobytes())
    img.convert("CMYK").save(out.setdefault("cmyk", folder / "cmyk.jpg"))
    img.convert("L").save(out.setdefault("grayscale", folder / "gray.jpg"))
    img.save(out.setdefault("progressive", folder / "progressive.jpg"), progressive=True)
    img.save(out.setdefault("baseline", folder / "baseline.jpg"), quality=90)
    whole = out["baseline"].read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    out["truncated"] = folder / "truncated.jpg"
    _photo(1, 1, 1).save(out.setdefault("1x1", folder / "one.jpg"))
    return out


def check_cases(device: torch.device) -> int:
    fails = 0
    with tempfile.TemporaryDirectory() as tmp:
        files = odd_jpegs(Path(tmp))
        dec = dd.DeviceDecoder(device, SPEC)
        for name, f in files.items():
            item = dd.read_for_device(str(f), spec=SPEC)
            try:
                ref = uint8_transform()(load_rgb(f)).int()
            except BadImage as e:
                ref = str(e)
            got = dec([item])
            x = got.take().cpu().int()
            if isinstance(ref, str):
                ok = got.reasons == [ref]
                detail = f"route={item.kind or 'skip'} reason {got.reasons[0]!r} (PIL path: {ref!r})"
            else:
                diff = (x[0] - ref).abs() if len(x) else None
                exact = item.kind == "crop"
                ok = diff is not None and (diff.max() == 0 if exact else diff.float().mean() < 2.0)
                detail = (f"route={item.kind} max|diff| {int(diff.max()) if diff is not None else '-'} "
                          f"mean {float(diff.float().mean()) if diff is not None else float('nan'):.3f} vs PIL path")
            fails += not ok
            raw = _raw_device_decode(f, device)
            report("PASS" if ok else "FAIL", f"case {name}", f"{detail}; raw device decode: {raw}")
    return fails


def _raw_device_decode(f: Path, device: torch.device) -> str:
    """What the device decoder alone makes of the file (nothing routed): for the record."""
    data = torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8)
    try:
        img = dd._decode([data], device, False)[0]
    except Exception as e:  # noqa: BLE001
        return f"fails ({dd._one_line(e)})"
    try:
        pil = torch.from_numpy(np.array(load_rgb(f, exif=False))).permute(2, 0, 1).int()
        if tuple(pil.shape) != tuple(img.shape):
            return f"{tuple(img.shape)} (PIL without EXIF: {tuple(pil.shape)})"
        return f"{tuple(img.shape)}, mean|diff| vs PIL {float((img.cpu().int() - pil).abs().float().mean()):.2f}"
    except BadImage as e:
        return f"{tuple(img.shape)} (PIL: {e})"


def _write_photo(job: tuple[Path, int, int, int]) -> None:
    path, w, h, k = job
    _photo(w, h, k).save(path, quality=88)


def photo_folder(root: Path, n: int, seed: int = 0) -> Path:
    """n photo-like JPEGs of many sizes (0.3-3 megapixels), two classes, train only; written in parallel."""
    from multiprocessing import Pool

    rng = np.random.default_rng(seed)
    jobs = []
    for k in range(n):
        w, h = int(rng.integers(600, 2000)), int(rng.integers(450, 1500))
        d = root / "train" / ("a" if k % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((d / f"{k:05d}.jpg", w, h, k))
    with Pool(min(16, max(1, len(jobs) // 8))) as pool:
        pool.map(_write_photo, jobs, chunksize=8)
    return root


def _extract(data: Path, cache: Path, device: str, batch: int, workers: int) -> np.ndarray:
    from cache import read_cache
    from pipeline.extract import ExtractConfig, extract

    extract(ExtractConfig(str(data), str(cache), weights="none", splits=("train",), batch_size=batch,
                          workers=workers, device=device, decoder="torchvision", precision="fp32", force=True))
    return read_cache(cache).splits["train"].features


@contextlib.contextmanager
def _old_way():
    """Decode on the forward's stream with no synchronize: what the tool did before the decode stream."""
    run = dd.DecodeStream.run
    dd.DecodeStream.run = lambda self, fn: (fn(), None)
    try:
        yield
    finally:
        dd.DecodeStream.run = run


def check_race(device: torch.device, images: int, batch: int, workers: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        data = photo_folder(Path(tmp) / "data", images)
        _extract(data, Path(tmp) / "warm.h5", device.type, batch, workers)  # cuDNN, nvJPEG, allocator warm
        dd.SYNC_EACH_DECODE = True
        t = time.perf_counter()
        ref = _extract(data, Path(tmp) / "ref.h5", device.type, batch, workers)
        t_ref = time.perf_counter() - t
        dd.SYNC_EACH_DECODE = False
        t = time.perf_counter()
        new = _extract(data, Path(tmp) / "new.h5", device.type, batch, workers)
        t_new = time.perf_counter() - t
        with _old_way():
            old = _extract(data, Path(tmp) / "old.h5", device.type, batch, workers)
    d_new, d_old = float(np.abs(new - ref).max()), float(np.abs(old - ref).max())
    ok = d_new <= 1e-5
    report("PASS" if ok else "FAIL", "race decode stream vs sync-before-each-decode",
           f"{images} images, batch {batch}: max|diff| {d_new:.3g} ({t_new:.1f} s vs {t_ref:.1f} s synced)")
    report("INFO", "race old way (decode on the forward's stream) vs synced", f"max|diff| {d_old:.3g}"
           + (" (the race reproduced)" if d_old > 1e-5 else " (not reproduced in this run)"))
    return 0 if ok else 1


def check_syncs(device: torch.device, batches: int, batch: int, workers: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        data = photo_folder(Path(tmp) / "data", batches * batch)
        _extract(data, Path(tmp) / "warm.h5", device.type, batch, workers)  # cuDNN, nvJPEG, allocator warm
        seen: dict[str, int] = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                _extract(data, Path(tmp) / "s.h5", device.type, batch, workers)
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
        for w in caught:
            if "synchroniz" in str(w.message).lower():
                key = f"{Path(w.filename).name}:{w.lineno} {str(w.message).splitlines()[0][:90]}"
                seen[key] = seen.get(key, 0) + 1
    total = sum(seen.values())
    report("INFO", "syncs", f"{total} synchronizing calls flagged over {batches} batches of {batch} "
           f"({total / max(batches, 1):.1f} per batch)")
    for key, n in sorted(seen.items(), key=lambda kv: -kv[1]):
        report("INFO", "sync", f"{n}x {key}")
    return 0


def check_stages(device: torch.device, batches: int, batch: int, workers: int, data: str | None) -> int:
    """Host time per stage with each stage ended by a synchronize (so device work lands in its stage)."""
    from pipeline.device_decode import RawFiles, collate_raw
    from pipeline.backbones import BackboneSpec, build_backbone
    from pipeline.extract import forward_features, prepare_module
    from pipeline.runtime import resolve_runtime

    with tempfile.TemporaryDirectory() as tmp:
        need = (batches + 1) * batch  # the first batch warms up
        root = Path(data) if data else photo_folder(Path(tmp) / "data", min(need, 512))  # files repeat
        files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        files = (files * (1 + need // max(len(files), 1)))[:need]
        rt = resolve_runtime(device.type, "auto")
        model = prepare_module(build_backbone(BackboneSpec("resnet18", "none", 0)).module, rt)
        keys = [(0, i) for i in range(len(files))]
        loader = torch.utils.data.DataLoader(RawFiles([(files, files, 0)], SPEC),
                                             batch_sampler=[keys[s:s + batch] for s in range(0, len(keys), batch)],
                                             num_workers=workers, collate_fn=collate_raw,
                                             prefetch_factor=4 if workers else None)
        dec = dd.DeviceDecoder(device, SPEC)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        times = {"worker wait": 0.0, "decode+resize": 0.0, "forward": 0.0, "copy back": 0.0}
        n, t_all = 0, time.perf_counter()
        it = iter(loader)
        for k in range(batches + 1):  # the first batch warms up and is not counted
            t0 = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            got = dec(b.items())
            x = got.take()
            sync()
            t2 = time.perf_counter()
            feats = forward_features(model, x, rt, SPEC)
            sync()
            t3 = time.perf_counter()
            feats.wait()
            t4 = time.perf_counter()
            if k == 0:
                t_all = time.perf_counter()
                continue
            n += len(x)
            for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[name] += dt
        wall = time.perf_counter() - t_all
    per = {k: 1000 * v / max(batches, 1) for k, v in times.items()}
    report("INFO", "stages", f"{n} images in {wall:.2f} s serialised = {n / max(wall, 1e-9):.0f} images/s; per batch of "
           f"{batch}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in per.items()))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("check", choices=["cases", "race", "syncs", "stages"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--data", default=None)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        report("FAIL", a.check, "no CUDA device here (use --device cpu for a dry run)")
        return 1
    if a.check == "cases":
        return check_cases(device)
    if a.check == "race":
        return check_race(device, a.images, a.batch_size, a.workers)
    if a.check == "syncs":
        return check_syncs(device, a.batches, a.batch_size, a.workers)
    return check_stages(device, a.batches, a.batch_size, a.workers, a.data)


if __name__ == "__main__":
    sys.exit(main())
