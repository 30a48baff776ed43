"""Help texts say what each command does: extract trains nothing (no grad scaler), and names the offline
backbone."""
from click.testing import CliRunner

from cli import cli


def flat(args) -> str:
    r = CliRunner().invoke(cli, args, terminal_width=200)
    assert r.exit_code == 0, r.output
    return " ".join(r.output.split())


def test_extract_help_trains_nothing_and_names_the_offline_backbone():
    extract, finetune = flat(["extract", "--help"]), flat(["finetune", "--help"])
    assert "grad scaler" not in extract and "fp16 = fp16 autocast (CUDA)" in extract
    assert "Recorded in the cache fingerprint" in extract
    assert "fp16 (CUDA) trains with a grad scaler" in finetune
    assert "efficientnet_lite0 (ImageNet weights shipped in its package: works offline)" in extract
    assert "efficientnet_lite0" in flat(["run", "--help"])
