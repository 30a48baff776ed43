"""Messy folders: bad files are skipped with a reason and everything else is used; odd images convert."""
import json
import os
import struct
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cache import read_cache
from cli import cli
from pipeline.data import load_rgb
from pipeline.extract import ExtractConfig, extract
from pipeline.finetune import FinetuneConfig, finetune
from tests.conftest import make_dataset


def png_header_only(width: int, height: int) -> bytes:
    """A valid-looking PNG that claims width x height pixels but holds only 100 bytes of pixel data:
    decoding it would fail as truncated, so a 'too large' reason proves it was refused from the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
            + chunk(b"IEND", b""))


def add_bad_files(root):
    good = (root / "train/ants/img_000.jpg").read_bytes()
    bad = {
        "train/ants/truncated.jpg": good[: len(good) // 2],
        "train/ants/zero.jpg": b"",
        "train/ants/page.jpg": b"<!DOCTYPE html><html><body>404</body></html>",
        "train/bees/noise.png": os.urandom(300),
        "train/bees/bomb.png": png_header_only(40000, 40000),  # > 2x Pillow's limit: refused by Image.open
        "train/bees/big.png": png_header_only(10000, 10000),  # between 1x and 2x: refused by our header check
    }
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    os.mkfifo(root / "train/bees/pipe.jpg")
    os.symlink(root / "nowhere.jpg", root / "train/bees/dangling.jpg")
    return {
        "train/ants/page.jpg": "not a readable image (PIL cannot identify it)",
        "train/ants/truncated.jpg": "truncated image file (",
        "train/ants/zero.jpg": "empty file (0 bytes)",
        "train/bees/bomb.png": "image too large, possible decompression bomb (Image size (1600000000 pixels)",
        "train/bees/big.png": "image too large, possible decompression bomb (10000x10000 pixels > limit 89478485)",
        "train/bees/dangling.jpg": "broken symbolic link",
        "train/bees/noise.png": "not a readable image (PIL cannot identify it)",
        "train/bees/pipe.jpg": "not a regular file",
    }


def test_bad_files_skipped_reported_and_the_rest_used(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": {"ants": 3, "bees": 3}, "val": {"ants": 1, "bees": 1}})
    expected = add_bad_files(root)
    cache = tmp_path / "f.h5"
    r = CliRunner().invoke(cli, ["extract", str(root), "--cache", str(cache), "--weights", "none", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "extracted train 6, val 2 | skipped 8 |" in r.output
    assert "skipped train/ants/zero.jpg: empty file (0 bytes)" in r.output
    c = read_cache(cache)
    assert c.splits["train"].paths == [f"train/{c}/img_{i:03d}.jpg" for c in ("ants", "bees") for i in range(3)]
    got = dict(c.skipped)
    assert got.keys() == expected.keys()
    for path, reason in expected.items():
        assert got[path].startswith(reason), (path, got[path])
    m = CliRunner().invoke(cli, ["train-head", str(cache), "--out", str(tmp_path / "run"), "--epochs", "1",
                                 "--no-plots"])
    assert m.exit_code == 0
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert {p for p, _ in metrics["skipped"]} == set(expected)


def test_max_skipped_fails_clearly_and_keeps_work(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": {"ants": 2, "bees": 2}, "val": {"ants": 1, "bees": 1}})
    for i in range(5):
        (root / f"train/ants/bad{i}.jpg").write_bytes(b"nope")
    args = ["extract", str(root), "--cache", str(tmp_path / "f.h5"), "--weights", "none", "--workers", "0"]
    r = CliRunner().invoke(cli, args + ["--max-skipped", "0.25"])
    assert r.exit_code == 1
    assert "5 of 11 files in" in r.output and "more than --max-skipped 0.25" in r.output
    assert not (tmp_path / "f.h5").exists() and (tmp_path / "f.h5.partial").is_dir()
    r = CliRunner().invoke(cli, args + ["--max-skipped", "5"])
    assert r.exit_code == 0 and "skipped 5" in r.output and "resumed: 11 images" in r.output


def _save(img: Image.Image, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def test_odd_but_valid_images_convert_to_rgb(tmp_path):
    cmyk = _save(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    grey = _save(Image.new("L", (8, 6), 77), tmp_path / "grey.png")
    pal = Image.new("P", (8, 6), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal_t = _save(pal, tmp_path / "pal.png", transparency=0)
    rgba = Image.new("RGBA", (8, 6), (0, 0, 255, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba_p = _save(rgba, tmp_path / "rgba.png")
    arr16 = np.full((6, 8), 65535, np.uint16)
    arr16[0, 0] = 32896  # 128.5 * 256 -> 128 after scaling, not clipped to 255
    i16 = _save(Image.fromarray(arr16), tmp_path / "i16.png")
    one = _save(Image.new("RGB", (1, 1), (9, 8, 7)), tmp_path / "one.PNG")
    exif = Image.new("RGB", (8, 4), (255, 0, 0))
    ex = exif.getexif()
    ex[0x0112] = 6  # orientation: rotate 90 on display
    rot = _save(exif, tmp_path / "rot.jpg", exif=ex.tobytes())

    assert load_rgb(cmyk).getpixel((2, 2))[0] > 200 and load_rgb(cmyk).getpixel((2, 2))[1] < 50
    assert load_rgb(grey).getpixel((1, 1)) == (77, 77, 77)
    assert load_rgb(pal_t).getpixel((0, 0)) == (255, 255, 255)  # transparent over white
    assert load_rgb(pal_t).getpixel((1, 1)) == (10, 200, 30)
    assert load_rgb(rgba_p).getpixel((0, 0)) == (255, 255, 255) and load_rgb(rgba_p).getpixel((3, 3)) == (0, 0, 255)
    im16 = load_rgb(i16)
    assert im16.getpixel((1, 1)) == (255, 255, 255) and im16.getpixel((0, 0)) == (128, 128, 128)
    assert load_rgb(one).size == (1, 1)
    assert load_rgb(rot).size == (4, 8)  # EXIF orientation applied
    for p in (cmyk, grey, pal_t, rgba_p, i16, one, rot):
        assert load_rgb(p).mode == "RGB"


def test_odd_images_are_extracted(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}})
    _save(Image.new("CMYK", (30, 20)), root / "train/a/cmyk.JPG")
    _save(Image.fromarray(np.full((20, 30), 40000, np.uint16)), root / "train/b/deep.png")
    _save(Image.new("RGB", (1, 1)), root / "train/b/tiny.png")
    s = extract(ExtractConfig(str(root), str(tmp_path / "f.h5"), weights="none", workers=0))
    assert s["rows"]["train"] == 5 and s["skipped"] == []
    assert np.isfinite(read_cache(tmp_path / "f.h5").splits["train"].features).all()


def test_a_split_of_only_bad_files_is_a_clear_error(tmp_path):
    from cli import cli as app

    root = make_dataset(tmp_path / "d", {"train": {"ants": 2, "bees": 2}})
    (root / "val/ants").mkdir(parents=True)
    (root / "val/ants/a.jpg").write_bytes(b"")
    r = CliRunner().invoke(app, ["run", str(root), "--out", str(tmp_path / "run"), "--weights", "none",
                                 "--workers", "0"])
    assert r.exit_code == 1 and "has no usable val images (all were skipped)" in r.output
    r = CliRunner().invoke(app, ["finetune", str(root), "--out", str(tmp_path / "ft"), "--weights", "none",
                                 "--workers", "0"])
    assert r.exit_code == 1 and f"the val split of {root} has no usable images" in r.output


def test_finetune_excludes_bad_files_and_reports_them(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": {"ants": 2, "bees": 2}, "val": {"ants": 1, "bees": 1}})
    (root / "train/ants/zero.jpg").write_bytes(b"")
    (root / "val/bees/page.jpg").write_text("<html></html>")
    m = finetune(FinetuneConfig(str(root), str(tmp_path / "ft"), weights="none", workers=0, epochs=1, plots=False))
    assert m["n"] == {"train": 4, "val": 2}
    assert m["skipped"] == [["train/ants/zero.jpg", "empty file (0 bytes)"],
                            ["val/bees/page.jpg", "not a readable image (PIL cannot identify it)"]]


def test_preview_out_without_a_picture_extension_is_one_line(tiny_data, tmp_path):
    from click.testing import CliRunner

    from cli import cli

    r = CliRunner().invoke(cli, ["preview", str(tiny_data), "--out", str(tmp_path / "grid")])
    assert r.exit_code == 1 and r.output.startswith(f"Error: --out {tmp_path / 'grid'}: name a picture file ending in .png")
    assert not (tmp_path / "grid").exists()


@pytest.mark.parametrize("splits", ["train,/abs/val", "train,../other/val", "train,skipped"])
def test_finetune_refuses_split_names_that_are_not_sub_folders(tiny_data, tmp_path, splits):
    from click.testing import CliRunner

    from cli import cli

    r = CliRunner().invoke(cli, ["finetune", str(tiny_data), "--out", str(tmp_path / "ft"), "--weights", "none",
                                 "--splits", splits, "--workers", "0"])
    assert r.exit_code == 1 and r.output.startswith("Error: --splits: "), r.output
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("splits", ["train,", "train,,val", " ,val"])
def test_an_empty_split_name_is_a_usage_error(tiny_data, tmp_path, splits):
    """' ,val' used to drop the blank name and write a val-only cache (exit 0)."""
    r = CliRunner().invoke(cli, ["extract", str(tiny_data), "--cache", str(tmp_path / "c.h5"), "--weights", "none",
                                 "--splits", splits])
    assert r.exit_code == 2 and "holds an empty split name" in r.output and not (tmp_path / "c.h5").exists()


def test_a_class_whose_files_all_fail_to_decode_is_an_empty_class(tmp_path):
    """Scanning finds files in train/bees, decoding keeps none: refused as an empty class folder is (it used to
    train and report a class of support 0), by extract and finetune; --allow-empty-class keeps it."""
    root = make_dataset(tmp_path / "d", {"train": {"ants": 2}, "val": {"ants": 1}})
    (root / "train/bees").mkdir()
    (root / "train/bees/zero.jpg").write_bytes(b"")
    (root / "train/bees/page.jpg").write_text("<html></html>")
    line = (f"Error: class folder {root / 'train/bees'} has no images that decode (all 2 failed, e.g. "
            "train/bees/page.jpg: not a readable image (PIL cannot identify it)); add images, remove the folder, "
            "or pass --allow-empty-class")
    flags = ["--weights", "none", "--workers", "0"]
    cache = tmp_path / "c.h5"
    r = CliRunner().invoke(cli, ["extract", str(root), "--cache", str(cache), *flags])
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1] == line, r.output
    assert not cache.exists()
    r = CliRunner().invoke(cli, ["finetune", str(root), "--out", str(tmp_path / "ft"), "--epochs", "1", *flags])
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1] == line, r.output
    assert not (tmp_path / "ft/model.pt").exists()
    r = CliRunner().invoke(cli, ["extract", str(root), "--cache", str(cache), "--allow-empty-class", *flags])
    assert r.exit_code == 0, r.output
    c = read_cache(cache)
    assert c.class_names == ["ants", "bees"] and c.splits["train"].labels.tolist() == [0, 0]


def test_a_flat_class_whose_train_files_all_fail_to_decode_is_refused(tmp_path):
    from pipeline.splits import assign, flat_spec
    from tests.conftest import write_image

    root = tmp_path / "flat"
    for i in range(4):
        write_image(root / "ants" / f"a{i}.jpg", 0, i)
    spec = flat_spec(None, None, 0)
    names = [n for n in (f"b{i}.jpg" for i in range(40)) if assign(f"bees/{n}", spec) == "train"][:2]
    names += [n for n in (f"b{i}.jpg" for i in range(40)) if assign(f"bees/{n}", spec) == "val"][:1]
    for n in names[:2]:
        (root / "bees" / n).parent.mkdir(parents=True, exist_ok=True)
        (root / "bees" / n).write_bytes(b"")
    write_image(root / "bees" / names[2], 1, 9)  # its only image that decodes falls into val
    r = CliRunner().invoke(cli, ["extract", str(root), "--cache", str(tmp_path / "c.h5"), "--weights", "none",
                                 "--workers", "0"])
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines()[-1] == (
        f"Error: class folder {root / 'bees'} has no train images that decode (all 2 failed, e.g. bees/{min(names[:2])}: "
        "empty file (0 bytes)); add images, remove the folder, or pass --allow-empty-class")
