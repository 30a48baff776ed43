"""Random backbone weights (--weights none) are said where their results are read: audit's report (its
near duplicates and outliers mean little) and predict / --sort-into (one line on stderr)."""
import json
from types import SimpleNamespace

from click.testing import CliRunner

from cli import cli
from pipeline.audit import RANDOM_WEIGHTS_NOTE
from pipeline.predict import random_weights_note
from tests.conftest import head_run_folder


def test_audit_of_a_random_weights_cache_says_so_first(small_cache, tmp_path):
    r = CliRunner().invoke(cli, ["audit", str(small_cache), "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[1] == RANDOM_WEIGHTS_NOTE
    assert RANDOM_WEIGHTS_NOTE.startswith("WARNING: these features come from random backbone weights")
    assert json.loads((tmp_path / "a" / "audit.json").read_text())["notes"][0] == RANDOM_WEIGHTS_NOTE


def test_predict_and_sort_into_with_a_random_weights_run_say_so_in_one_line(tmp_path):
    data, run = head_run_folder(tmp_path, {"train": {"ants": 3, "bees": 3}, "val": {"ants": 1, "bees": 1}})
    r = CliRunner().invoke(cli, ["predict", str(run), str(data / "val"), "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)) == 2  # stdout stays the JSON alone
    assert r.stderr.splitlines() == [  # the warning, then (3 train photos) the run has no novelty model
        "WARNING: this run was trained on random backbone weights (--weights none): its predictions are likely "
        "near chance; retrain with ImageNet weights (--weights imagenet, or --backbone efficientnet_lite0 offline)",
        "note: this run has no novelty model (made before novelty scores, or train was too small): photos of none "
        "of its classes are not told apart; train the head again to get them"]
    r = CliRunner().invoke(cli, ["predict", str(run), str(data / "val"), "--sort-into", str(tmp_path / "sorted")])
    assert r.exit_code == 0, r.output
    assert sum(line.startswith("WARNING: this run was trained on random backbone weights") for line in
               r.stderr.splitlines()) == 1


def test_runs_on_real_weights_say_nothing():
    head = SimpleNamespace(kind="head", features={"backbone": {"weights": "imagenet"}}, recipe={})
    ft = SimpleNamespace(kind="finetune", features=None, recipe={"weights": "/w/resnet18.pt"})
    assert random_weights_note(head) == random_weights_note(ft) == ""
    assert random_weights_note(SimpleNamespace(kind="finetune", features=None, recipe={"weights": "none"}))
