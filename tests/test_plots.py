from PIL import Image

from pipeline.plots import confusion_png, curves_png, pick_examples, predictions_png
from tests.conftest import write_image


def test_pick_examples_shows_wrong_ones_and_every_class():
    y_true = [0] * 5 + [1] * 5
    y_pred = [0, 1, 0, 0, 0, 1, 1, 0, 1, 1]  # wrong: 1 and 7
    picked = pick_examples(y_true, y_pred, n=4)
    assert picked == [0, 1, 7, 9]
    assert pick_examples([0, 1], [0, 1], n=8) == [0, 1] and pick_examples([], []) == []


def test_pictures_are_written(tmp_path):
    hist = [{"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.1 / (e + 1), "train_acc": 0.5 + e / 10,
             "val_acc": 0.4 + e / 10} for e in range(3)]
    curves_png(hist, tmp_path / "curves.png")
    confusion_png([[3, 1], [0, 4]], ["ants", "bees"], tmp_path / "confusion.png")
    imgs = [write_image(tmp_path / f"i{i}.jpg", i % 2, i) for i in range(4)]
    predictions_png(imgs + [tmp_path / "gone.jpg"], [0, 1, 0, 1, 1], [0, 1, 1, 1, 0], ["ants", "bees"],
                    tmp_path / "predictions.png")
    for name in ("curves.png", "confusion.png", "predictions.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    assert not list(tmp_path.glob(".*tmp*"))
