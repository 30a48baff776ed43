"""The device decoder's decisions, held on the CPU: which JPEGs take the PIL path, what stops a run and
what is one file's problem, the pixel budget, the decode stream's protocol (through a fake CUDA), the
background decode thread and the hashes the workers compute."""
import hashlib
import io

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import pipeline.data as data_mod
import pipeline.device_decode as dd
from cache import read_cache
from pipeline.data import load_rgb, normalize_batch, uint8_transform
from pipeline.device_decode import (DecodeStream, DeviceDecodeError, DeviceDecoder, RawItem, decode_crops,
                                    read_for_device)
from pipeline.preprocess import Preprocess
from tests.conftest import make_dataset

CPU = torch.device("cpu")
SPEC = Preprocess(decoder="torchvision")


def _photo(size=(64, 48), seed=0) -> Image.Image:
    """Not symmetric (a gradient plus noise), so a rotation shows in the pixels."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w)[None, :]
    arr[..., 1] = np.linspace(0, 255, h)[:, None]
    arr[..., 2] = rng.integers(0, 255, (h, w))
    return Image.fromarray(arr, "RGB")


def _jpegs(tmp_path):
    """name -> path: what phones and odd tools write."""
    out = {}
    img = _photo()
    for tag in (6, 8):
        exif = Image.Exif()
        exif[dd.EXIF_ORIENTATION] = tag
        img.save(out.setdefault(f"exif{tag}", tmp_path / f"exif{tag}.jpg"), exif=exif.tobytes())
    img.convert("CMYK").save(out.setdefault("cmyk", tmp_path / "cmyk.jpg"))
    img.save(out.setdefault("progressive", tmp_path / "progressive.jpg"), progressive=True)
    img.save(out.setdefault("baseline", tmp_path / "baseline.jpg"))
    img.convert("L").save(out.setdefault("gray", tmp_path / "gray.jpg"))
    whole = out["baseline"].read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    out["truncated"] = tmp_path / "truncated.jpg"
    img.save(out.setdefault("png", tmp_path / "plain.png"))
    return out


def test_jpegs_a_device_decoder_gets_wrong_take_the_pil_path(tmp_path):
    files = _jpegs(tmp_path)
    items = {k: read_for_device(str(f)) for k, f in files.items()}
    assert {k: it.kind for k, it in items.items()} == {
        "exif6": "crop", "exif8": "crop", "cmyk": "crop", "progressive": "crop", "png": "crop",
        "baseline": "jpeg", "gray": "jpeg", "truncated": ""}
    for k in ("exif6", "exif8", "cmyk", "progressive", "png"):  # the PIL path's crop, to the pixel
        assert torch.equal(items[k].payload, uint8_transform()(load_rgb(files[k]))), k
    # rotated: a 64 x 48 photo tagged 6 or 8 is portrait once EXIF is applied
    assert load_rgb(files["exif6"]).size == (48, 64)
    with pytest.raises(data_mod.BadImage) as bad:
        load_rgb(files["truncated"])
    assert items["truncated"].reason == str(bad.value) and "truncated" in str(bad.value)
    assert items["baseline"].pixels == 64 * 48 and items["baseline"].sha256 == \
        hashlib.sha256(files["baseline"].read_bytes()).hexdigest()


def test_an_exif_tag_gives_the_pil_features_with_a_decoder_that_ignores_it(tmp_path, monkeypatch):
    """nvJPEG does not rotate: a decoder that ignores the tag still gives the rotated (PIL) crop."""
    files = _jpegs(tmp_path)
    real = dd._decode
    monkeypatch.setattr(dd, "_decode", lambda datas, device, exif=True: real(datas, device, False))
    x, reasons = decode_crops([read_for_device(str(files[k])) for k in ("exif6", "baseline", "exif8")], CPU, SPEC)
    assert reasons == ["", "", ""]
    assert torch.equal(x[0], uint8_transform()(load_rgb(files["exif6"])))
    assert torch.equal(x[2], uint8_transform()(load_rgb(files["exif8"])))


def test_exif_off_sends_tagged_jpegs_to_the_device(tmp_path):
    files = _jpegs(tmp_path)
    assert read_for_device(str(files["exif6"]), spec=Preprocess(decoder="torchvision", exif=False)).kind == "jpeg"


def _items(tmp_path, n=4):
    out = []
    for k in range(n):
        p = tmp_path / f"p{k}.jpg"
        _photo((60 + 8 * k, 40), seed=k).save(p)
        out.append(read_for_device(str(p)))
    return out


def test_a_decoder_that_fails_as_a_whole_stops_with_one_error(tmp_path, monkeypatch):
    items = _items(tmp_path)

    def broken(datas, device, exif=True):
        raise RuntimeError("decode_jpegs_cuda: torchvision not compiled with nvJPEG support")

    monkeypatch.setattr(dd, "_decode", broken)
    with pytest.raises(DeviceDecodeError, match="failed as a whole .*nvJPEG support.*--decoder pil"):
        decode_crops(items, CPU, SPEC)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"), ImportError("no torchvision")])
def test_machine_errors_stop_at_once_even_for_one_file(tmp_path, monkeypatch, error):
    calls = []

    def failing(datas, device, exif=True):
        calls.append(len(datas))
        raise error

    monkeypatch.setattr(dd, "_decode", failing)
    with pytest.raises(DeviceDecodeError, match=type(error).__name__):
        decode_crops(_items(tmp_path), CPU, SPEC)
    assert calls == [4]  # no per-file retries, no PIL fallback turning it into skips


def test_a_file_the_device_cannot_decode_is_tried_by_pil_before_it_is_skipped(tmp_path, monkeypatch):
    items = _items(tmp_path)
    bad_bytes = items[1].payload
    real = dd._decode

    def picky(datas, device, exif=True):  # bitstream errors for one file's bytes, as nvJPEG gives
        if any(d is bad_bytes for d in datas):
            raise RuntimeError("Error while decoding JPEG images: nvjpegDecodeJpeg failed: 6")
        return real(datas, device, exif)

    monkeypatch.setattr(dd, "_decode", picky)
    html = tmp_path / "page.jpg"
    html.write_text("<html>")
    lying = RawItem("jpeg", bad_bytes, "", str(html), 40 * 68)  # the file changed: PIL cannot read it either
    x, reasons = decode_crops(items + [lying], CPU, SPEC)
    assert reasons[:4] == ["", "", "", ""] and "PIL cannot identify" in reasons[4]
    assert x.shape == (4, 3, 224, 224)
    assert torch.equal(x[1], uint8_transform()(load_rgb(items[1].path)))  # PIL's crop for the refused one
    x_ok, _ = decode_crops(items, CPU, SPEC)
    assert torch.equal(x[0], x_ok[0]) and torch.equal(x[3], x_ok[3])


def test_a_batch_of_only_bad_files_is_skipped_not_stopped_while_the_decoder_works(tmp_path, monkeypatch):
    """Every file of the batch fails, but the decoder still decodes its probe: the files are bad, not the GPU."""
    real = dd._decode
    probe = dd.probe_jpeg()
    monkeypatch.setattr(dd, "_decode", lambda datas, device, exif=True: real(datas, device, exif)
                        if all(bytes(d.numpy()) == probe for d in datas) else (_ for _ in ()).throw(
                            RuntimeError("nvjpegDecodeJpeg failed: 6")))
    html = tmp_path / "page.jpg"
    html.write_text("<html>")
    items = _items(tmp_path, 1)
    x, reasons = decode_crops([RawItem("jpeg", items[0].payload, "", str(html), 40 * 60)] + items, CPU, SPEC)
    assert "PIL cannot identify" in reasons[0] and reasons[1] == "" and x.shape == (1, 3, 224, 224)
    assert torch.equal(x[0], uint8_transform()(load_rgb(items[0].path)))  # PIL's crop for the one it could read


def _batches_of_one_segment_each(tmp_path):
    return make_dataset(tmp_path / "d", {"train": {"a": 3, "b": 3}, "val": {"a": 2, "b": 2}})


def test_a_run_whose_decoder_breaks_stops_in_one_line_and_remembers_no_skips(tmp_path, monkeypatch):
    from cache.store import PartialWriter  # noqa: F401  (the segments are read as the writer wrote them)
    from cli import cli

    data = _batches_of_one_segment_each(tmp_path)
    cache = tmp_path / "c.h5"
    real, calls = dd._decode, {"n": 0}

    def dies_after_first(datas, device, exif=True):  # a sticky CUDA error after the first batch
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(datas, device, exif)

    monkeypatch.setattr(dd, "_decode", dies_after_first)
    args = ["extract", str(data), "--cache", str(cache), "--weights", "none", "--workers", "0", "--device", "cpu",
            "--decoder", "torchvision", "--batch-size", "2"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines() == [r.output.strip().splitlines()[-1]]
    assert "device JPEG decoder failed as a whole (RuntimeError: CUDA error" in r.output
    assert "Traceback" not in r.output and not cache.exists()
    segs = sorted((tmp_path / "c.h5.partial").glob("*.npz"))
    assert segs and all(np.load(s)["ok"].all() for s in segs)  # what was kept: good rows only
    monkeypatch.setattr(dd, "_decode", real)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    c = read_cache(cache)
    assert c.skipped == [] and {s: len(sp.paths) for s, sp in c.splits.items()} == {"train": 6, "val": 4}


def test_decode_calls_and_resize_groups_keep_to_the_pixel_budget(tmp_path, monkeypatch):
    items = []
    for k in range(7):  # three of one size (a same-size group), four others
        p = tmp_path / f"b{k}.jpg"
        _photo((80, 60) if k < 3 else (70 + k, 50), seed=k).save(p)
        items.append(read_for_device(str(p)))
    unbounded, _ = decode_crops(items, CPU, SPEC)
    decoded, resized = [], []
    real_decode, real_resize = dd._decode, dd.resize_crop_group
    monkeypatch.setattr(dd, "_decode", lambda datas, device, exif=True: (
        decoded.append(sum(it.pixels for it in items if any(it.payload is d for d in datas))),
        real_decode(datas, device, exif))[1])
    monkeypatch.setattr(dd, "resize_crop_group", lambda x, spec: (
        resized.append(x.shape[0] * x.shape[-2] * x.shape[-1]), real_resize(x, spec))[1])
    monkeypatch.setattr(dd, "DEVICE_PIXEL_BUDGET", 2 * 80 * 60)
    bounded, reasons = decode_crops(items, CPU, SPEC)
    assert reasons == [""] * 7 and torch.equal(bounded, unbounded)
    assert len(decoded) == 4 and max(decoded) <= 2 * 80 * 60 and sum(decoded) == sum(it.pixels for it in items)
    assert max(resized) <= 2 * 80 * 60 and len(resized) == 6  # the 3 same-size images: 2 groups, not 1
    assert dd.budget_chunks([5, 5, 5, 20, 1], 10) == [[0, 1], [2], [3], [4]]


class _FakeCuda:
    """Just enough of torch.cuda to record what DecodeStream does, and in which order."""

    def __init__(self, log):
        self.log, self.current = log, "forward"
        fake = self

        class Stream:
            def __init__(self, device):
                self.name = "decode"

            def synchronize(self):
                fake.log.append(f"synchronize {self.name}")

            def wait_event(self, ev):
                fake.log.append(f"{self.name} waits for {ev.name}")

        class Event:
            def __init__(self):
                self.name = "ready"

            def record(self, stream):
                fake.log.append(f"ready recorded on {stream.name}")

        self.Stream, self.Event = Stream, Event
        self.forward = Stream(None)
        self.forward.name = "forward"

    def synchronize(self, device):
        self.log.append("synchronize the device")

    def device(self, device):
        import contextlib
        return contextlib.nullcontext()

    def stream(self, s):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            before, self.current = self.current, s.name
            self.log.append(f"enter {s.name}")
            yield
            self.current = before
            self.log.append(f"leave {s.name}")
        return ctx()

    def current_stream(self, device):
        return self.forward


def test_decode_stream_protocol_through_a_fake_cuda(tmp_path, monkeypatch):
    log = []
    fake = _FakeCuda(log)
    real = dd._decode
    monkeypatch.setattr(dd, "_decode", lambda d, dev, exif=True: (log.append(f"decode on {fake.current}"),
                                                                  real(d, dev, exif))[1])
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: log.append(f"crops used on {s.name}"),
                        raising=False)
    decoder = DeviceDecoder(CPU, SPEC, DecodeStream(CPU, cuda=fake))
    items = _items(tmp_path, 2)
    dec = decoder(items)
    assert log == ["synchronize decode", "enter decode", "decode on decode", "ready recorded on decode",
                   "leave decode"]
    x = dec.take()
    assert log[5:] == ["forward waits for ready", "crops used on forward"]
    assert torch.equal(x, decode_crops(items, CPU, SPEC)[0])
    log.clear()
    monkeypatch.setattr(dd, "SYNC_EACH_DECODE", True)  # the race check's reference mode
    decoder(items).take()
    assert log == ["synchronize the device", "decode on forward"]


def test_normalisation_constants_are_made_once_per_device(monkeypatch):
    data_mod._norm_constants.cache_clear()
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: (made.append(a), real(*a, **k))[1])
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    first = normalize_batch(x, Preprocess())
    for _ in range(3):
        assert torch.equal(normalize_batch(x, Preprocess()), first)
    assert len(made) == 2  # mean and std, once
    with torch.inference_mode():  # constants made inside inference mode work outside it too
        data_mod._norm_constants.cache_clear()
        normalize_batch(x, Preprocess())
    y = torch.zeros(2, 3, 8, 8, requires_grad=True)
    (normalize_batch(x, Preprocess()) * y).sum().backward()


def test_device_path_extract_decodes_ahead_in_order_with_worker_hashes(tmp_path, monkeypatch):
    """Batches of 2 decoded on the background thread: every row is its own file's features, and the
    files' sha256s come from the workers (the main process hashes nothing)."""
    from cache.store import PartialWriter
    from pipeline.extract import ExtractConfig, extract

    def no_main_hashing(self, *a, **k):
        raise AssertionError("the main process hashed the files again")

    monkeypatch.setattr(PartialWriter, "file_digests", no_main_hashing)
    data = _batches_of_one_segment_each(tmp_path)
    for decoder in ("torchvision", "pil"):
        cache = tmp_path / f"{decoder}.h5"
        extract(ExtractConfig(str(data), str(cache), weights="none", workers=0, batch_size=2, decoder=decoder))
        c = read_cache(cache)
        for split, sp in c.splits.items():
            for p in sp.paths:
                assert c.file_stats[p].sha256 == hashlib.sha256((data / p).read_bytes()).hexdigest()
    # row i of the device cache is file i's features, computed alone
    from pipeline.backbones import BackboneSpec, build_backbone

    model = build_backbone(BackboneSpec("resnet18", "none", 0)).module.eval()
    c = read_cache(tmp_path / "torchvision.h5")
    for split, sp in c.splits.items():
        x, _ = decode_crops([read_for_device(str(data / p)) for p in sp.paths], CPU, SPEC)
        with torch.inference_mode():
            ref = model(normalize_batch(x, SPEC)).numpy()
        np.testing.assert_allclose(sp.features, ref, rtol=1e-4, atol=1e-4)


def test_raw_item_bytes_round_trip(tmp_path):
    p = tmp_path / "a.jpg"
    _photo().save(p)
    it = read_for_device(str(p))
    assert bytes(it.payload.numpy()) == p.read_bytes()
    assert Image.open(io.BytesIO(bytes(it.payload.numpy()))).size == (64, 48)


def test_batch_size_defaults_by_device_when_not_given(tmp_path, monkeypatch):
    import pipeline.extract as ex

    assert ex.default_batch_size("cuda") == 256 and ex.default_batch_size(torch.device("cpu")) == 64
    monkeypatch.setattr(ex, "default_batch_size", lambda device: 3)  # what the device's default would be
    data = _batches_of_one_segment_each(tmp_path)
    assert ex.ExtractConfig("d", "c").batch_size is None
    sizes = []
    real = ex.PartialWriter.write_segment
    monkeypatch.setattr(ex.PartialWriter, "write_segment",
                        lambda self, split, start, feats, reasons, *a, **k: (sizes.append(len(reasons)),
                                                                            real(self, split, start, feats, reasons,
                                                                                 *a, **k))[1])
    ex.extract(ex.ExtractConfig(str(data), str(tmp_path / "d.h5"), weights="none", workers=0, splits=("train",)))
    assert sizes == [3, 3]
    sizes.clear()
    ex.extract(ex.ExtractConfig(str(data), str(tmp_path / "e.h5"), weights="none", workers=0, splits=("train",),
                                batch_size=5))
    assert sizes == [5, 1]


@pytest.mark.parametrize("interpolation, antialias", [("bilinear", True), ("bilinear", False), ("bicubic", True),
                                                      ("bicubic", False)])
@pytest.mark.parametrize("native", [True, False])  # False: the float path a GPU takes
def test_resize_crop_equals_torchvision_resize_and_center_crop(monkeypatch, interpolation, antialias, native):
    import torchvision.transforms.v2.functional as F

    spec = Preprocess(decoder="torchvision", interpolation=interpolation, antialias=antialias)
    g = torch.Generator().manual_seed(1)
    mode = {"bilinear": F.InterpolationMode.BILINEAR, "bicubic": F.InterpolationMode.BICUBIC}[interpolation]
    for size in [(375, 500), (500, 333), (256, 300), (30, 40), (224, 224), (257, 1000)]:
        x = torch.randint(0, 256, (3, 3) + size, dtype=torch.uint8, generator=g)
        if native:
            ref = F.resize(x, [256], interpolation=mode, antialias=antialias)
            assert dd._native_uint8_resize(CPU, interpolation)
        else:  # torchvision's path for uint8 on CUDA: float32, interpolate, (clamp), round, uint8
            monkeypatch.setattr(dd, "_native_uint8_resize", lambda device, interp: False)
            f = F.resize(x.float(), [256], interpolation=mode, antialias=antialias)
            mine = torch.nn.functional.interpolate(x.float(), size=list(f.shape[-2:]), mode=interpolation,
                                                   align_corners=False, antialias=antialias)
            assert (mine - f).abs().max() <= 1e-5  # the float resize is the reference's, to float rounding
            ref = (f.clamp(0, 255) if interpolation == "bicubic" else f).round().to(torch.uint8)
        assert torch.equal(dd.resize_crop_group(x, spec), F.center_crop(ref, [224, 224])), size


def test_decode_ops_load_without_importing_torchvision_and_equal_its_decode(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    data = _batches_of_one_segment_each(tmp_path)
    probe = ("import sys, pipeline.device_decode as dd\n"
             "from pipeline.extract import ExtractConfig, extract\n"
             f"s = extract(ExtractConfig({str(data)!r}, {str(tmp_path / 'c.h5')!r}, weights='none', workers=0, "
             "decoder='torchvision'))\n"
             "print(dd.image_ops(), s['rows'], 'torchvision' in sys.modules, 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.stdout.split() == ["True", "{'train':", "6,", "'val':", "4}", "False", "False"], out.stderr
    from torchvision.io import ImageReadMode, decode_jpeg

    files = _jpegs(tmp_path)
    for k in ("exif6", "baseline", "gray", "progressive", "cmyk"):
        data = torch.frombuffer(bytearray(files[k].read_bytes()), dtype=torch.uint8)
        for exif in (True, False):
            ref = decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=exif)
            assert torch.equal(dd._decode([data], CPU, exif)[0], ref), (k, exif)


def test_segments_are_written_on_a_writer_thread_and_its_errors_reach_the_run(tmp_path, monkeypatch):
    import threading

    import pipeline.extract as ex

    data = _batches_of_one_segment_each(tmp_path)
    threads, real = [], ex.PartialWriter.write_segment

    def full_disk_on_second(self, split, start, *a, **k):
        threads.append(threading.current_thread().name)
        if len(threads) == 2:
            raise OSError(28, "No space left on device", str(self.dir))
        return real(self, split, start, *a, **k)

    monkeypatch.setattr(ex.PartialWriter, "write_segment", full_disk_on_second)
    cfg = ex.ExtractConfig(str(data), str(tmp_path / "c.h5"), weights="none", workers=0, batch_size=2)
    with pytest.raises(OSError, match="No space left"):
        ex.extract(cfg)
    assert threads and all(t.startswith("tlearn-write") for t in threads)
    kept = sorted(p.name for p in (tmp_path / "c.h5.partial").glob("*.npz"))
    assert "train-000000000-000000002.npz" in kept and len(kept) == len(threads) - 1  # every other batch written
    monkeypatch.setattr(ex.PartialWriter, "write_segment", real)
    s = ex.extract(cfg)  # the rerun resumes
    assert s["resumed"] == 2 * len(kept) and read_cache(tmp_path / "c.h5").splits["val"].features.shape == (4, 512)


def test_decode_runs_ahead_on_its_thread_except_in_the_race_checks_reference_mode(tmp_path, monkeypatch):
    import threading

    from pipeline.extract import ExtractConfig, extract

    data = _batches_of_one_segment_each(tmp_path)
    names, real = [], dd._decode
    monkeypatch.setattr(dd, "_decode", lambda d, dev, exif=True: (names.append(threading.current_thread().name),
                                                                  real(d, dev, exif))[1])
    for sync_each in (False, True):
        monkeypatch.setattr(dd, "SYNC_EACH_DECODE", sync_each)
        names.clear()
        extract(ExtractConfig(str(data), str(tmp_path / f"{sync_each}.h5"), weights="none", workers=0, batch_size=4,
                              decoder="torchvision"))
        expected = threading.main_thread().name if sync_each else "tlearn-decode"
        assert names and all(n.startswith(expected) for n in names), names
    a, b = (read_cache(tmp_path / f"{m}.h5") for m in (False, True))
    for split in a.splits:
        np.testing.assert_array_equal(a.splits[split].features, b.splits[split].features)
