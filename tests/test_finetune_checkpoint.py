"""A finished finetune says what its checkpoint.pt is (the resume state, ~130 MB for ResNet-18) and that it
may be deleted; the file stays (the tool deletes nothing of a run without being asked)."""
import pytest
from click.testing import CliRunner

from cli import cli
from pipeline.finetune import checkpoint_note


def test_the_note_names_the_file_and_its_size(tmp_path):
    assert checkpoint_note(tmp_path / "checkpoint.pt") == []
    (tmp_path / "checkpoint.pt").write_bytes(b"\0" * 3_000_000)
    assert checkpoint_note(tmp_path / "checkpoint.pt") == [
        f"{tmp_path / 'checkpoint.pt'} (3 MB) is the last epoch's resume state; the run is complete and model.pt "
        "holds the kept weights, so it can be deleted to free the space"]


@pytest.mark.slow
def test_a_finished_finetune_says_so(tiny_data, tmp_path):
    out = tmp_path / "ft"
    r = CliRunner().invoke(cli, ["finetune", str(tiny_data), "--out", str(out), "--weights", "none", "--epochs", "1",
                                 "--workers", "0", "--no-plots"])
    assert r.exit_code == 0, r.output
    assert (out / "checkpoint.pt").is_file()
    assert f"{out / 'checkpoint.pt'} (" in r.stderr and "it can be deleted to free the space" in r.stderr
