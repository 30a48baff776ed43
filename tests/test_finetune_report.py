"""finetune's report and progress: backbone/weights and warnings, a bar that moves per batch with epoch lines
of their own, and an honest Ctrl-C message before the first finished epoch."""
import io
import json

import pytest
from click.testing import CliRunner

import pipeline.finetune as ftmod
from cli import BarProgress, cli
from pipeline.finetune import finetune
from pipeline.metrics import format_accuracy
from pipeline.progress import Progress
from tests.conftest import finetune_config, make_dataset
from tests.test_metrics import SHARED_KEYS


class Recorder(Progress):
    def __init__(self):
        self.events = []

    def start(self, total, label):
        self.events.append(("start", total))

    def update(self, n):
        self.events.append(("update", n))

    def log(self, message):
        self.events.append(("log", message))


def test_bar_moves_per_batch_and_the_report_names_random_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(ftmod, "DECODE_NOTE_MIN", 1)  # the decode pass is announced from 100 images
    data = make_dataset(tmp_path / "data", {"train": {"ants": 3, "bees": 3}, "val": {"ants": 2, "bees": 4}})
    rec = Recorder()
    m = finetune(finetune_config(data, tmp_path / "ft", batch_size=4, plots=False), rec)
    # 2 epochs x (2 train batches of 6 images + 2 val batches of 6): was start(2) and one update per epoch
    assert rec.events[0] == ("log", "decoding 12 of 12 images once to find unreadable ones (later runs into this "
                                    "folder reuse the verdicts)")
    assert ("start", 8) in rec.events
    assert sum(n for e, n in rec.events if e == "update") == 8
    first_epoch_line = next(i for i, e in enumerate(rec.events) if e[0] == "log" and str(e[1]).startswith("epoch 0"))
    assert [e for e in rec.events[:first_epoch_line] if e[0] == "update" and e[1]] == [("update", 1)] * 4
    assert (m["backbone"], m["weights"]) == ("resnet18", "none")
    report = (tmp_path / "ft" / "report.txt").read_text()
    assert report.startswith("backbone resnet18, weights none (random init)\nWARNING: random weights (--weights none)")
    assert "WARNING: tiny val split: 6 images (ants 2, bees 4)" in report
    saved = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert saved["warnings"] == m["warnings"]
    assert SHARED_KEYS <= set(saved) and saved["kind"] == "finetune"  # train-head's keys for the shared part
    recall = [r[i] / sum(r) for i, r in enumerate(saved["confusion_matrix"]["val"])]
    assert saved["balanced_accuracy"]["val"] == pytest.approx(sum(recall) / 2)


def test_finetune_report_has_the_balanced_accuracy_line(tmp_path):
    """finetune's report.txt is built by the same builder as train-head's: each split's line carries the
    balanced accuracy with its interval, as metrics.json has it."""
    data = make_dataset(tmp_path / "data", {"train": {"ants": 3, "bees": 3}, "val": {"ants": 2, "bees": 4}})
    finetune(finetune_config(data, tmp_path / "ft", batch_size=4, plots=False, epochs=1), Recorder())
    report = (tmp_path / "ft" / "report.txt").read_text()
    saved = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    b = saved["balanced_accuracy_ci"]["val"]
    assert (f"== val: 6 images, accuracy {format_accuracy(saved['accuracy_ci']['val'])}, balanced accuracy "
            f"{b['value']:.4f} (95% CI {b['low']:.3f}-{b['high']:.3f}) ==\n") in report
    assert f"\n\nbest val acc {format_accuracy(saved['best_val_acc_ci'])} at epoch {saved['best_epoch']}\n\n" in report


def test_epoch_lines_do_not_land_on_the_bar(monkeypatch):
    err = io.StringIO()
    err.isatty = lambda: True
    monkeypatch.setattr("sys.stderr", err)
    bar = BarProgress()
    bar.start(10, "finetune")
    bar.update(3)
    bar.log("epoch 0: train loss 0.7")
    bar.update(1)
    bar.close()
    out = err.getvalue()
    before, after = out.split("epoch 0: train loss 0.7\n")
    assert before.endswith("\r\x1b[K")  # the bar's line was cleared, the message has a line of its own
    assert "3/10" in before and "4/10" in after and "3/10" in after.split("4/10")[0]  # redrawn below it


def test_ctrl_c_before_the_first_epoch_says_nothing_was_kept(tiny_data, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ftmod, "train_one_epoch", interrupted)
    out = tmp_path / "ft"
    r = CliRunner().invoke(cli, ["finetune", str(tiny_data), "--out", str(out), "--weights", "none", "--epochs", "2",
                                 "--workers", "0", "--no-plots"])
    assert r.exit_code == 1
    assert r.output.strip() == ("Error: interrupted before the first epoch finished; nothing was kept: run the same "
                                "command again to start over")
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("cut", [1])
def test_ctrl_c_after_an_epoch_still_offers_resume(tiny_data, tmp_path, monkeypatch, cut):
    real, calls = ftmod.train_one_epoch, {"n": 0}

    def second_dies(*a, **k):
        calls["n"] += 1
        if calls["n"] > cut:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ftmod, "train_one_epoch", second_dies)
    r = CliRunner().invoke(cli, ["finetune", str(tiny_data), "--out", str(tmp_path / "ft"), "--weights", "none",
                                 "--epochs", "2", "--workers", "0", "--no-plots"])
    assert r.exit_code == 1 and "the last finished epoch is kept: resume with" in r.output
