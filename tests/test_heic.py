"""HEIC/HEIF (pillow-heif) and AVIF (Pillow) photos are used like JPEGs: listed, decoded upright on every
path (extract, predict, finetune's check, the pictures), and their features are those of the same photo
as PNG within the loss of the format."""
import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps, features

from cache import read_cache
from cli import cli
from pipeline import heif
from pipeline.audit_plots import _thumb
from pipeline.data import IMG_EXTENSIONS, BadImage, find_unreadable, load_rgb, scan_files
from pipeline.plots import thumbnail
from tests.conftest import REPO

pillow_heif = pytest.importorskip("pillow_heif")  # a dependency: installed with the project
ORIENTATION = 0x0112


def photo(label: int, seed: int, size=(96, 64)) -> Image.Image:
    """A smooth picture (lossy codecs keep it close) whose colour says its class; no symmetry, so a
    rotation or a mirror shows."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.array([[200, 60, 40], [40, 90, 200]][label], dtype=np.float64)
    rng = np.random.default_rng(seed)
    arr = base + 40 * np.sin(xx / (9 + seed % 5))[..., None] * rng.uniform(0.5, 1, 3) + (yy * 50 / h)[..., None]
    arr[: h // 4, : w // 4] = 255  # a white corner: top left when upright
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def save_heic(im: Image.Image, path, orientation: int | None = None):
    pillow_heif.register_heif_opener()  # the writer (the tool registers its reader on the first decode)
    exif = Image.Exif()
    if orientation:
        exif[ORIENTATION] = orientation
    im.save(path, format="HEIF", quality=95, exif=exif.tobytes())  # quality 95: close to the PNG
    return path


def close(a: Image.Image, b: Image.Image, tol: float = 6.0) -> bool:
    assert a.size == b.size, (a.size, b.size)
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean()) < tol


def test_extensions_and_decoder_agree(tmp_path):
    assert {".heic", ".heif", ".avif"} <= set(IMG_EXTENSIONS)
    f = save_heic(photo(0, 0), tmp_path / "IMG_0001.HEIC")
    files, skipped = scan_files([str(tmp_path)])
    assert files == [f] and skipped == []
    assert close(load_rgb(f), photo(0, 0))


@pytest.mark.parametrize("orientation, transpose", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90),
                                                    (3, Image.Transpose.ROTATE_180)])
def test_orientation_is_applied_as_for_jpeg(tmp_path, orientation, transpose):
    upright = photo(1, 2).transpose(transpose)  # what a viewer shows for that tag
    f = save_heic(photo(1, 2), tmp_path / "a.heic", orientation)
    jpeg = tmp_path / "a.jpg"
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    photo(1, 2).save(jpeg, quality=95, exif=exif.tobytes())
    assert close(load_rgb(f), upright) and close(load_rgb(jpeg), upright)
    assert close(load_rgb(f), load_rgb(jpeg))
    # the pictures (predictions.png, audit tiles) draw it upright too
    assert close(Image.fromarray(thumbnail(f)), upright)
    tile, why = _thumb(tmp_path, "a.heic")
    assert why == "" and close(Image.fromarray(tile), upright)


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow was built without AVIF")
def test_avif_with_an_orientation_tag(tmp_path):
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    f = tmp_path / "b.avif"
    photo(0, 3).save(f, quality=95, exif=exif.tobytes())
    assert close(load_rgb(f), photo(0, 3).transpose(Image.Transpose.ROTATE_270))


def test_without_pillow_heif_a_heic_file_says_what_to_install(tmp_path, monkeypatch):
    f = save_heic(photo(0, 0), tmp_path / "c.heic")
    monkeypatch.setattr(heif, "register_heif", lambda: False)
    with pytest.raises(BadImage, match=r"HEIC/HEIF needs pillow-heif \(pip install pillow-heif\)"):
        load_rgb(f)


def test_extract_and_predict_use_heic_photos_like_the_same_pngs(tmp_path):
    heic, png = tmp_path / "heic", tmp_path / "png"
    for split, n in (("train", 3), ("val", 1)):
        for label, cls in enumerate(("ants", "bees")):
            for i in range(n):
                seed = 10 * label + i + (5 if split == "val" else 0)
                (heic / split / cls).mkdir(parents=True, exist_ok=True)
                (png / split / cls).mkdir(parents=True, exist_ok=True)
                save_heic(photo(label, seed), heic / split / cls / f"IMG_{seed:04d}.HEIC", orientation=6)
                photo(label, seed).transpose(Image.Transpose.ROTATE_270).save(png / split / cls / f"IMG_{seed:04d}.png")
    feats = {}
    for name, root in (("heic", heic), ("png", png)):
        out = tmp_path / f"run_{name}"
        r = CliRunner().invoke(cli, ["run", str(root), "--out", str(out), "--weights", "none", "--workers", "0",
                                     "--max-skipped", "0", "--no-plots"])
        assert r.exit_code == 0, r.output
        assert "extracted train 6, val 2 | skipped 0" in r.output
        c = read_cache(out / "features.h5")
        feats[name] = np.concatenate([c.splits["train"].features, c.splits["val"].features])
    a, b = feats["heic"], feats["png"]
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.03  # HEIC is lossy: the same photos, within 3%
    r = CliRunner().invoke(cli, ["predict", str(tmp_path / "run_heic"), str(heic / "val"), "--json"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")] or json.loads(r.stdout)
    assert len(rows) == 2 and all("error" not in row and row["class"] in ("ants", "bees") for row in rows), rows
    reasons = find_unreadable([str(p) for p in sorted(heic.rglob("*.HEIC"))])
    assert reasons == [""] * 8  # finetune's decode check: every one readable


def test_the_cli_starts_without_importing_pillow_heif():
    code = "import sys, cli; cli.cli(['--help'], standalone_mode=False); print('pillow_heif' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "False", r.stdout + r.stderr
