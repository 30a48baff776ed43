"""tlearn: transfer learning from an ImageNet backbone, fast (cached features) or end to end.

Each command turns its options into a config and calls one pipeline function; errors become one line
(--debug or TLEARN_DEBUG=1 keeps the traceback). Heavy libraries (torch, h5py, matplotlib) are imported
inside the commands, so --help and small commands start in a fraction of a second.
"""
from __future__ import annotations

import functools
import json
import os
import sys

import click

from cache import CacheError
from pipeline import PipelineError
from pipeline.progress import Progress
from pipeline.runtime import PRECISIONS, default_workers


class BarProgress(Progress):
    """Progress drawn with click's bar on stderr (silent when stderr is not a terminal)."""

    def __init__(self):
        self.bar = None

    def start(self, total: int, label: str) -> None:
        if not sys.stderr.isatty():  # logs and pipes get the summary line, not a bar's label
            return
        self.bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True, show_eta=True)
        self.bar.__enter__()

    def update(self, n: int) -> None:
        if self.bar is not None and n:
            self.bar.update(n)

    def set(self, done: int) -> None:
        if self.bar is not None and done > self.bar.pos:
            self.bar.update(done - self.bar.pos)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def log(self, message: str) -> None:
        click.echo(message, err=True)


DEBUG_ENV = "TLEARN_DEBUG"


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def friendly_errors(fn):
    """Known problems -> 'Error: <one line>' and exit 1; Ctrl-C -> how to resume. With --debug the
    original exception (and its traceback) goes through unchanged."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if debugging():
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except (PipelineError, CacheError) as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:  # disk full, read-only folder, permissions: the OS's words and the path
            where = f": {e.filename}" if e.filename else ""
            raise click.ClickException(f"{e.strerror or e}{where}") from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted; rerun the same command to resume where it stopped") from None

    return wrapper


class NumberList(click.ParamType):
    """A number or a comma-separated list of numbers (a sweep)."""

    def __init__(self, kind):
        self.kind = kind
        self.name = f"{kind.__name__}[,{kind.__name__}...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            values = tuple(self.kind(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not a {self.kind.__name__} or a comma-separated list of them", param, ctx)
        if not values:
            self.fail("no value given", param, ctx)
        return values


def parse_max_skipped(ctx, param, value):
    if value is None:
        return None
    try:
        v = float(value)
    except ValueError:
        raise click.BadParameter("use a fraction below 1 (0.1 = 10%) or a count (5)") from None
    if v < 0:
        raise click.BadParameter("must be >= 0")
    return v


def parse_splits(ctx, param, value):
    splits = tuple(s.strip() for s in value.split(",") if s.strip())
    if not splits:
        raise click.BadParameter("name at least one split, e.g. train,val")
    return splits


def _set_debug(ctx, param, value):
    if value:
        os.environ[DEBUG_ENV] = "1"
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
              help=f"Show full tracebacks instead of one-line errors (or set {DEBUG_ENV}=1).")
def cli():
    """Transfer learning for image classifiers: extract features once, train heads in seconds."""


def extract_options(fn):
    opts = [
        click.option("--backbone", default="resnet18", show_default=True,
                     help="torchvision architecture name, or a torch.export .pt2 program (trusted files only)."),
        click.option("--weights", default="imagenet", show_default=True,
                     help="imagenet (torchvision IMAGENET1K_V1 via TORCH_HOME), none (random init from --seed), "
                          "or PATH to a state_dict."),
        click.option("--splits", default="train,val", show_default=True, callback=parse_splits,
                     help="Sub-folders of DATA_DIR; test is added when present."),
        click.option("--views", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Augmented views (RandomResizedCrop+flip) stored per train image."),
        click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1)),
        click.option("--workers", default=default_workers(), show_default=True, type=click.IntRange(min=0),
                     help="DataLoader worker processes decoding images."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda."),
        click.option("--precision", default="auto", show_default=True, type=click.Choice(PRECISIONS),
                     help="auto = fp32 on CPU, bf16 autocast on CUDA; recorded in the fingerprint."),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--draft", is_flag=True, help="Faster JPEG decoding (DCT downscale); changes features slightly."),
        click.option("--decoder", default="pil", show_default=True, type=click.Choice(["pil", "torchvision"]),
                     help="torchvision: decode JPEGs on the device (nvJPEG on a GPU); pixels differ slightly."),
        click.option("--allow-empty-class", is_flag=True, help="Keep a class whose train folder has no images."),
        click.option("--max-skipped", default=None, callback=parse_max_skipped,
                     help="Fail when more files than this are unusable: a fraction (<1) or a count."),
        click.option("--force", is_flag=True, help="Rebuild a cache made with other settings or files."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def head_options(prefix: str = ""):
    """Head recipe options. train-head names them as DESIGN.md does (--batch-size, --seed, --device);
    `run`, which also has extract's options, prefixes the three that clash with --head-."""

    def decorate(fn):
        opts = [
            click.option("--epochs", default="25", type=NumberList(int), show_default=True),
            click.option("--lr", default="0.001", type=NumberList(float), show_default=True,
                         help="Learning rate; a list such as 0.0003,0.001,0.003 sweeps (every numeric flag does)."),
            click.option("--momentum", default="0.9", type=NumberList(float), show_default=True),
            click.option("--step-size", default="7", type=NumberList(int), show_default=True),
            click.option("--gamma", default="0.1", type=NumberList(float), show_default=True),
            click.option(f"--{prefix}batch-size", "head_batch_size", default="4", type=NumberList(int),
                         show_default=True, help="Head training batch size."),
            click.option(f"--{prefix}seed", "head_seed", default="0", type=NumberList(int), show_default=True,
                         help="Seed of the head's init, shuffling and view draws."),
            click.option(f"--{prefix}device", "head_device", default="cpu", show_default=True,
                         help="cpu (fastest for a linear head), cuda or auto."),
            click.option("--no-views", is_flag=True, help="Ignore the cache's augmented views."),
            click.option("--no-plots", is_flag=True, help="Skip curves.png, confusion.png, predictions.png."),
        ]
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return decorate


def _extract_config(data_dir, cache, o: dict):
    from pipeline.extract import ExtractConfig

    return ExtractConfig(data_dir=data_dir, cache=cache, backbone=o["backbone"], weights=o["weights"],
                         splits=o["splits"], views=o["views"], batch_size=o["batch_size"], workers=o["workers"],
                         device=o["device"], precision=o["precision"], seed=o["seed"], force=o["force"],
                         draft=o["draft"], decoder=o["decoder"], allow_empty_class=o["allow_empty_class"],
                         max_skipped=o["max_skipped"])


def _head_config(cache, out, o: dict):
    from pipeline.train_head import HeadConfig

    return HeadConfig(cache=cache, out=out, epochs=o["epochs"], lr=o["lr"], momentum=o["momentum"],
                      step_size=o["step_size"], gamma=o["gamma"], batch_size=o["head_batch_size"],
                      seed=o["head_seed"], device=o["head_device"], use_views=not o["no_views"], plots=not o["no_plots"])


def is_rank0() -> bool:
    """Under torchrun only rank 0 draws progress and prints summaries."""
    return os.environ.get("RANK", "0") == "0"


def progress_bar() -> Progress:
    return BarProgress() if is_rank0() else Progress()


def _do_extract(cfg):
    from pipeline.extract import extract, summary_line

    summary = extract(cfg, progress_bar())
    if not is_rank0():
        return summary
    for path, reason in summary["skipped"][:20]:
        click.echo(f"skipped {path}: {reason}", err=True)
    if len(summary["skipped"]) > 20:
        click.echo(f"... and {len(summary['skipped']) - 20} more skipped (listed in the cache's /skipped)", err=True)
    click.echo(summary_line(summary))
    return summary


def _do_train_head(cfg, sidecar=None):
    from pipeline.train_head import run_train_head

    m = run_train_head(cfg, sidecar)
    for note in m.get("notes", []):
        click.echo(note, err=True)
    if "sweep" in m:
        click.echo(sweep_table(m["sweep"]))
    click.echo(m["report_text"])
    click.echo(f"trained in {m['seconds']:.3f} s; run folder {cfg.out}")
    return m


def sweep_table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k not in ("best_val_acc", "best_epoch") and len({r[k] for r in rows}) > 1]
    best = max(range(len(rows)), key=lambda i: rows[i]["best_val_acc"])
    lines = ["  ".join(f"{k:>10}" for k in keys) + "  best_val_acc  best_epoch"]
    for i, r in enumerate(rows):
        mark = "  <- best" if i == best else ""
        lines.append("  ".join(f"{r[k]:>10g}" for k in keys) + f"  {r['best_val_acc']:>12.4f}  {r['best_epoch']:>10d}{mark}")
    return "\n".join(lines)


@cli.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--cache", "cache_path", required=True, type=click.Path(dir_okay=False),
              help="HDF5 feature cache to write.")
@extract_options
@friendly_errors
def extract(data_dir, cache_path, **o):
    """Run the frozen backbone once per image; store pooled features in an HDF5 cache.

    Example: cli.py extract data/hymenoptera_data --cache feats.h5
    """
    _do_extract(_extract_config(data_dir, cache_path, o))


@cli.command("train-head")
@click.argument("cache_path", metavar="FILE.h5", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@head_options()
@friendly_errors
def train_head(cache_path, out, **o):
    """Train the new linear layer on cached features (the tutorial's recipe; lists sweep).

    Example: cli.py train-head feats.h5 --out runs/head --lr 0.0003,0.001,0.003
    """
    _do_train_head(_head_config(cache_path, out, o))


@cli.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--cache", "cache_path", default=None, type=click.Path(dir_okay=False),
              help="Feature cache (default: RUN_DIR/features.h5).")
@extract_options
@head_options("head-")
@friendly_errors
def run(data_dir, out, cache_path, **o):
    """The main job in one command: extract (or reuse) the cache, then train-head.

    Example: cli.py run data/hymenoptera_data --out runs/ants
    """
    from pathlib import Path

    from pipeline.runtime import resolve_device
    from pipeline.sidecar import sidecar

    cache_path = cache_path or str(Path(out) / "features.h5")
    # the report/picture process loads scikit-learn and matplotlib during extract, at low priority
    with sidecar(plots=not o["no_plots"], nice=10, enabled=is_rank0()) as side:
        resolve_device(o["head_device"])  # a bad --head-device fails now, not after the extract
        _do_extract(_extract_config(data_dir, cache_path, o))
        _do_train_head(_head_config(cache_path, out, o), side)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@friendly_errors
def report(run_dir):
    """Print the saved classification report of a run folder again.

    Example: cli.py report runs/ants
    """
    from pathlib import Path

    path = Path(run_dir) / "report.txt"
    if not path.is_file():
        raise PipelineError(f"{run_dir} has no report.txt; is it a run folder of train-head or finetune?")
    click.echo(path.read_text().rstrip("\n"))


@cli.command()
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--url", default=None, help="Zip to fetch (default: the tutorial's hymenoptera_data.zip).")
@friendly_errors
def download(dest, url):
    """Fetch and safely unpack the tutorial's ants/bees dataset into DEST.

    Example: cli.py download data/   (gives data/hymenoptera_data/{train,val})
    """
    from pipeline.download import DATASET_URL, download_dataset

    result = download_dataset(dest, url or DATASET_URL, BarProgress())
    click.echo(result["message"])


@cli.command()
@click.argument("cache_path", metavar="FILE.h5", type=click.Path(exists=True, dir_okay=False))
@friendly_errors
def info(cache_path):
    """Describe a feature cache: what made it, rows per split, skipped files.

    Example: cli.py info feats.h5
    """
    from cache import read_cache

    c = read_cache(cache_path, with_views=True)
    a = c.attrs
    click.echo(f"{cache_path}: {a['format']}, complete, created {a.get('created', '?')}")
    click.echo(f"backbone {a['backbone']}  weights {a['weights']}  precision {a['precision']}  "
               f"feature_dim {a['feature_dim']}  views {a.get('views', 0)}  draft {bool(a.get('draft'))}")
    click.echo(f"classes {', '.join(c.class_names)}")
    for name, sp in c.splits.items():
        counts = ", ".join(f"{cls} {int((sp.labels == i).sum())}" for i, cls in enumerate(c.class_names))
        extra = f", views {tuple(sp.views.shape)}" if sp.views is not None else ""
        click.echo(f"  {name}: {len(sp.labels)} rows ({counts}){extra}")
    click.echo(f"skipped {len(c.skipped)}" + "".join(f"\n  {p}: {r}" for p, r in c.skipped[:20]))
    click.echo(f"fingerprint {a['fingerprint']}")


@cli.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--backbone", default="resnet18", show_default=True, help="torchvision architecture name.")
@click.option("--weights", default="imagenet", show_default=True, help="imagenet, none or PATH to a state_dict.")
@click.option("--freeze-backbone", is_flag=True,
              help="The tutorial's frozen mode end to end: only the new layer learns, backbone in the loop.")
@click.option("--epochs", default=25, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=0.001, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--momentum", default=0.9, show_default=True, type=click.FloatRange(min=0))
@click.option("--step-size", default=7, show_default=True, type=click.IntRange(min=1))
@click.option("--gamma", default=0.1, show_default=True, type=float)
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=default_workers(), show_default=True, type=click.IntRange(min=0))
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(PRECISIONS),
              help="auto = fp32 on CPU, bf16 autocast on CUDA; fp16 uses a grad scaler.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last finished epoch.")
@click.option("--splits", default="train,val", show_default=True, callback=parse_splits)
@click.option("--allow-empty-class", is_flag=True)
@click.option("--max-skipped", default=None, callback=parse_max_skipped)
@click.option("--no-plots", is_flag=True)
@friendly_errors
def finetune(data_dir, out, no_plots, **o):
    """Fine-tune the whole network end to end (the tutorial's first scenario).

    Example: cli.py finetune data/hymenoptera_data --out runs/ft --epochs 25
    """
    from pipeline.finetune import FinetuneConfig, finetune as run_finetune

    m = run_finetune(FinetuneConfig(data_dir=data_dir, out=out, plots=not no_plots, **o), progress_bar())
    if not is_rank0():
        return
    for path, reason in m["skipped"][:20]:
        click.echo(f"skipped {path}: {reason}", err=True)
    for note in m.get("notes", []):
        click.echo(note, err=True)
    click.echo(m["report_text"])
    click.echo(f"trained {len(m['history'])} epochs in {m['seconds']:.1f} s; run folder {out}")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("inputs", metavar="IMAGE_OR_DIR...", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON list instead of a table.")
@click.option("--device", default="auto", show_default=True)
@friendly_errors
def predict(run_dir, inputs, as_json, device):
    """Class and probability for each image (files or folders); bad files are reported, not fatal.

    Example: cli.py predict runs/ants photo1.jpg more_photos/ --json
    """
    from pipeline.predict import format_table, predict as run_predict

    preds = run_predict(run_dir, list(inputs), device)
    if as_json:
        click.echo(json.dumps([p.as_dict() for p in preds], indent=2))
    else:
        click.echo(format_table(preds))
    if preds and all(p.error for p in preds):
        raise click.ClickException("no input could be classified")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help=".pt2 file to write.")
@friendly_errors
def export(run_dir, out):
    """Export the run's classifier as a torch.export program: images -> class probabilities.

    The program takes float32 N x 3 x 224 x 224 images in [0, 1] (after Resize 256 + CenterCrop 224)
    and normalises them itself. Example: cli.py export runs/ants --out ants.pt2
    """
    from pipeline.predict import export_program

    r = export_program(run_dir, out)
    click.echo(f"exported {run_dir} -> {r['path']} (classes: {', '.join(r['class_names'])})")


@cli.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("-n", "--count", default=8, show_default=True, type=click.IntRange(min=1, max=64))
@click.option("--seed", default=0, show_default=True, type=int)
@friendly_errors
def preview(data_dir, out, count, seed):
    """A grid of augmented training images titled with their class.

    Example: cli.py preview data/hymenoptera_data --out preview.png
    """
    from pipeline.preview import preview as run_preview

    r = run_preview(data_dir, out, count, seed)
    click.echo(f"wrote {r['path']} ({r['n']} images)")


def main():
    cli(prog_name="tlearn")


if __name__ == "__main__":
    main()
