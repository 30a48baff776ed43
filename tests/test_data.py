import pytest
from PIL import Image

from pipeline import PipelineError
from pipeline.data import load_rgb, scan_dataset, scan_files
from tests.conftest import make_dataset, write_image


def test_scan_sorted_classes_files_and_skips(tmp_path):
    root = make_dataset(tmp_path, {"train": {"bees": 2, "ants": 2}, "val": {"ants": 1, "bees": 1}})
    write_image(root / "train/ants/UPPER.JPG", 0, 99)
    write_image(root / "train/bees/x.JpEg", 1, 98, fmt="JPEG")
    (root / "train/ants/notes.txt").write_text("hi")
    (root / "train/ants/anim.gif").write_bytes(b"GIF89a")
    (root / "train/.DS_Store").write_bytes(b"\0")
    (root / "train/ants/.hidden.jpg").write_bytes(b"\0")
    write_image(root / "train/ants/.ipynb_checkpoints/copy.jpg", 0, 97)
    write_image(root / "train/.ipynb_checkpoints/x.jpg", 0, 96)
    ds = scan_dataset(root, ["train", "val"])
    assert ds.class_names == ["ants", "bees"]
    tr = ds.splits["train"]
    assert tr.paths == ["train/ants/UPPER.JPG", "train/ants/img_000.jpg", "train/ants/img_001.jpg",
                        "train/bees/img_000.jpg", "train/bees/img_001.jpg", "train/bees/x.JpEg"]
    assert tr.labels == [0, 0, 0, 1, 1, 1]
    assert tr.skipped == [("train/ants/anim.gif", "not an image extension (.gif)"),
                          ("train/ants/notes.txt", "not an image extension (.txt)")]
    assert ds.splits["val"].paths == ["val/ants/img_000.jpg", "val/bees/img_000.jpg"]


def test_test_split_added_when_present(tmp_path):
    root = make_dataset(tmp_path, {"train": {"a": 1, "b": 1}, "val": {"a": 1}, "test": {"b": 1}})
    ds = scan_dataset(root, ["train", "val"])
    assert list(ds.splits) == ["train", "val", "test"]
    assert ds.splits["test"].labels == [1]


@pytest.mark.parametrize("case, message", [
    ("no_classes", "no class folders in"),
    ("missing_split", "split folder"),
    ("unknown_val_class", "is not a class of the train split"),
    ("empty_class", "has no images"),
    ("empty_val", "has no images (looked for"),
])
def test_structural_problems_fail_with_folder_named(tmp_path, case, message):
    root = tmp_path / "d"
    if case == "no_classes":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
        bad = root / "train"
    elif case == "missing_split":
        make_dataset(root, {"train": {"a": 1}})
        bad = root / "val"
    elif case == "unknown_val_class":
        make_dataset(root, {"train": {"a": 1}, "val": {"a": 1, "wasps": 1}})
        bad = root / "val" / "wasps"
    elif case == "empty_val":
        make_dataset(root, {"train": {"a": 1}})
        (root / "val" / "a").mkdir(parents=True)
        (root / "val" / "a" / "notes.txt").write_text("x")
        bad = root / "val"
    else:
        make_dataset(root, {"train": {"a": 1}, "val": {"a": 1}})
        (root / "train" / "b").mkdir()
        bad = root / "train" / "b"
    with pytest.raises(PipelineError) as e:
        scan_dataset(root, ["train", "val"])
    assert message in str(e.value) and str(bad) in str(e.value)


def test_empty_class_allowed_with_flag(tmp_path):
    root = make_dataset(tmp_path, {"train": {"a": 2}, "val": {"a": 1}})
    (root / "train" / "b").mkdir()
    ds = scan_dataset(root, ["train", "val"], allow_empty_class=True)
    assert ds.class_names == ["a", "b"]


def test_scan_files_for_predict(tmp_path):
    a = write_image(tmp_path / "one.png", 0, 1, fmt="PNG")
    write_image(tmp_path / "dir/two.jpg", 1, 2)
    (tmp_path / "dir/readme.md").write_text("x")
    files, skipped = scan_files([str(a), str(tmp_path / "dir"), str(tmp_path / "missing.jpg")])
    assert files == [a, tmp_path / "dir/two.jpg"]
    assert skipped == [(str(tmp_path / "dir/readme.md"), "not an image extension (.md)"),
                       (str(tmp_path / "missing.jpg"), "no such file")]


def test_load_rgb_converts_modes(tmp_path):
    Image.new("L", (5, 4), 128).save(tmp_path / "g.png")
    Image.new("CMYK", (5, 4), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    for name in ("g.png", "c.jpg"):
        img = load_rgb(tmp_path / name)
        assert img.mode == "RGB" and img.size == (5, 4)
    assert load_rgb(tmp_path / "g.png").getpixel((0, 0)) == (128, 128, 128)


def test_augmentation_is_torchvisions_random_resized_crop_and_flip():
    from torchvision import transforms as T

    from pipeline.data import train_transform, view_transform
    from pipeline.preprocess import Preprocess

    for tf, crop in ((train_transform(), 224), (view_transform(Preprocess(resize=180, crop=160)), 160)):
        rrc, flip = tf.steps[:2]
        assert isinstance(rrc, T.RandomResizedCrop) and isinstance(flip, T.RandomHorizontalFlip)
        assert rrc.size == (crop, crop) and rrc.scale == (0.08, 1.0) and rrc.ratio == (3 / 4, 4 / 3)
        assert rrc.interpolation == T.InterpolationMode.BILINEAR and flip.p == 0.5


# (width, height, seed) -> (top, left, height, width) and flip: what the tool's own copy of RandomResizedCrop drew
# (exactly torchvision's). Another answer from a new torchvision changes every seeded crop: old --views caches
# would mix crops, so Preprocess.describe's views record needs a revision then.
SEEDED_CROPS = {(500, 375, 0): ((17, 80, 294, 343), True), (500, 375, 1): ((71, 153, 272, 311), True),
                (500, 375, 2): ((13, 54, 360, 336), False), (31, 17, 0): ((1, 2, 16, 18), True),
                (31, 17, 1): ((3, 9, 14, 16), True), (31, 17, 2): ((1, 8, 14, 17), False),
                (1200, 90, 0): ((0, 540, 90, 120), False), (1200, 90, 2): ((0, 540, 90, 120), True)}


def test_a_seed_gives_the_crops_it_always_gave():
    import torch
    from torchvision import transforms as T

    for (w, h, seed), (box, flip) in SEEDED_CROPS.items():
        torch.manual_seed(seed)
        got = tuple(T.RandomResizedCrop.get_params(Image.new("RGB", (w, h)), [0.08, 1.0], [3 / 4, 4 / 3]))
        assert (got, bool(torch.rand(1) < 0.5)) == (box, flip), (w, h, seed)


def test_augmented_crops_are_seeded_per_image_whatever_the_workers(tmp_path):
    """finetune (LabelledImages) and --views (ImageFiles) seed torch's global RNG per image around the
    transform: the same crops run after run and with any number of DataLoader workers; the caller's RNG is
    left as it was."""
    import torch

    from pipeline.data import ImageFiles, LabelledImages, train_transform

    files = [str(write_image(tmp_path / f"{k}.png", 0, k, size=(60 + 9 * k, 40), fmt="PNG")) for k in range(4)]
    train = LabelledImages(files, [0] * 4, train_transform(), seed=3)
    views = ImageFiles([(files, [f"{k}.png" for k in range(4)], 2)], seed=3)
    keys = {"train": [(e, i) for e in (0, 1) for i in range(4)], "views": [(0, i) for i in range(4)]}

    def crops(ds, name, workers):
        loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=keys[name], num_workers=workers)
        return torch.cat([b[0] if name == "train" else b[1] for b in loader])

    for ds, name in ((train, "train"), (views, "views")):
        first = crops(ds, name, 0)
        assert torch.equal(first, crops(ds, name, 0)) and torch.equal(first, crops(ds, name, 2)), name
        state = torch.random.get_rng_state()
        ds[keys[name][1]]
        assert torch.equal(torch.random.get_rng_state(), state)  # (a DataLoader draws its own base seed)
    x = crops(train, "train", 0)
    assert not torch.equal(x[:4], x[4:])  # another epoch, other crops
    assert views[(0, 0)][1].shape == (2, 3, 224, 224) and ImageFiles([(files, files, 0)]).view_transform is None
