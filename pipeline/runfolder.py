"""The run folder, the one module that knows its files: model.pt (a versioned manifest), metrics.json,
report.txt, the pictures, and finetune's checkpoint.pt.

A run folder always holds one run:
- a writer holds a lock on it for the whole run (a second train-head or finetune into the same --out is
  refused while the first runs; the lock is a POSIX record lock, so it dies with the process that took it,
  never kept alive by a forked DataLoader worker);
- a run's files are written into a staging folder inside it, then a commit marker is written (the commit
  point) and the files are renamed into place; a kill before the marker leaves the previous run as it was,
  a kill after it is rolled forward by the next writer or reader. Files of the replaced run that the new
  run does not write (pictures after --no-plots) are removed with it;
- metrics.json lists the run's other files with their size and sha256 ("files"): the next run replaces or
  removes only those. A run-file name that the run did not write (a user's learning_curve.png, a report.txt
  edited since) is refused before any work, and one that appears or changes while a run works stops its
  commit (nothing is saved, nothing replaced);
- a folder holding the other kind of run (head vs finetune), or run-file names that no run of this tool
  wrote, is refused; nothing else in the folder is ever touched.
The same lock, staging and commit serve audit folders (audit.py): their lock says "(audit)".
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import threading
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Callable

from . import PipelineError
from .fsio import (LockBusy, ProcessLock, atomic_write_bytes, atomic_write_json, file_record, fsync_dir,
                   load_weights_only, unchanged)

FORMAT = "tlearn-run/2"
CHECKPOINT_FORMAT = "tlearn-checkpoint/1"
KINDS = ("head", "finetune")
MODEL = "model.pt"
METRICS = "metrics.json"
REPORT = "report.txt"
PICTURES = ("curves.png", "confusion.png", "predictions.png", "reliability.png", "coverage.png", "learning_curve.png",
            "novelty.png")
RUN_FILES = (MODEL, METRICS, REPORT, *PICTURES)  # what one committed run consists of
CHECKPOINT = "checkpoint.pt"
VERDICTS = "verdicts.json"  # finetune's decode verdicts, keyed by each file's stat identity
STAGING = ".tlearn-staging"
COMMIT = "COMMIT"
LOCK = ".tlearn-lock"
AUDIT_LABEL = "audit"  # the lock of an audit folder says so: a lock alone marks a run folder only without it
FILES = "files"  # metrics.json: {name: {"size", "sha256"}} of the run's other files


class RunFolderError(PipelineError):
    """A run folder that cannot be used as asked."""


class RunFolderBusy(RunFolderError):
    """Another process (or another run in this one) is writing the folder."""


class RunKindMismatch(RunFolderError):
    """The folder holds the other kind of run."""


class NotARunFolder(RunFolderError):
    """The folder holds files of a run's names that no run of this tool wrote."""


class FolderChanged(RunFolderError):
    """A file of the folder's names appeared or changed while a run (or an audit) worked."""


class ForeignOutput(RunFolderError):
    """An output file that exists and is not this tool's own earlier output of that kind."""


class ModelFileError(RunFolderError):
    """model.pt or checkpoint.pt is not a file of this tool (or of a format this version cannot read)."""


# --------------------------------------------------------------------------- model.pt: the run manifest


@dataclass
class RunManifest:
    """Everything predict and export need to rebuild the classifier from the run folder alone.

    head runs: `features` is the feature spec of the cache the head was trained on (backbone spec, feature
    size, cache fingerprint and path); the state_dict holds the Linear layer's weight (C, D) and bias (C,).
    finetune runs: `arch` is the torchvision architecture, `head` the qualified name of its new Linear
    layer, the state_dict the whole model's.
    Both: the image preprocessing the model saw (transform spec, precision, decoder, draft decoding).
    """

    kind: str
    class_names: list[str]
    state_dict: dict
    recipe: dict
    precision: str = "fp32"
    transform: dict | None = None
    decoder: str = "pil"
    draft: bool = False
    features: dict | None = None  # head runs
    arch: str | None = None  # finetune runs
    head: str | None = None  # finetune runs
    weights_digest: str | None = None  # finetune runs: the initial backbone weights' content hash
    split: dict | None = None  # how train/val/test were made (flat folders: the tool's own split)
    # head runs: the calibration temperature (logits / T before softmax); None in runs made before it or not calibrated
    temperature: float | None = None
    # head runs: the novelty model (novelty.NoveltyModel.record()); None in runs made before it or too small for one
    novelty: dict | None = None
    format: str = field(default=FORMAT)

    @property
    def backbone(self) -> dict:
        """A head run's backbone spec (what extract recorded about the backbone that made the features)."""
        return self.features["backbone"]

    @property
    def decoding(self) -> dict:
        """How images were decoded for this model (predict decodes the same way)."""
        return {"decoder": self.decoder, "draft": self.draft}

    def to_payload(self) -> dict:
        """The dict torch.save writes: plain types and tensors only, so weights_only loading reads it."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_payload(cls, obj, source: str) -> RunManifest:
        """Reads this format and converts the unversioned shape of earlier versions; anything else is refused."""
        if not isinstance(obj, dict) or obj.get("kind") not in KINDS or not isinstance(obj.get("state_dict"), dict):
            raise ModelFileError(f"{source} is not a model file of this tool")
        fmt = obj.get("format")
        if fmt is None:
            obj = _from_unversioned(obj)
        elif fmt != FORMAT:
            raise ModelFileError(f"{source} has format {fmt!r}, which this version of tlearn cannot read "
                                 f"(it reads {FORMAT}); retrain the run with this version")
        names = {f.name for f in fields(cls)}
        try:
            m = cls(**{k: v for k, v in obj.items() if k in names})
        except TypeError as e:
            raise ModelFileError(f"{source} is not a complete model file of this tool ({e})") from None
        m.check(source)
        return m

    def check(self, source: str) -> None:
        problem = self._problem()
        if problem:
            raise ModelFileError(f"{source} is not a usable model file: {problem}; retrain the run")

    def _problem(self) -> str:
        if not (isinstance(self.class_names, list) and self.class_names
                and all(isinstance(c, str) for c in self.class_names)):
            return "class_names is not a list of names"
        if self.temperature is not None and not (isinstance(self.temperature, float)
                                                 and 0 < self.temperature < float("inf")):
            return "its temperature is not a positive number"
        if self.kind == "head":
            w, b = self.state_dict.get("weight"), self.state_dict.get("bias")
            if getattr(w, "ndim", 0) != 2 or getattr(b, "shape", None) != (w.shape[0],):
                return "the head's weight and bias are missing or of the wrong shape"
            if w.shape[0] != len(self.class_names):
                return f"{w.shape[0]} head outputs for {len(self.class_names)} class names"
            if not isinstance(self.features, dict) or not isinstance(self.features.get("backbone"), dict):
                return "it does not say which backbone made its features"
        elif not isinstance(self.arch, str):
            return "it does not name its architecture"
        return ""


def _from_unversioned(obj: dict) -> dict:
    """model.pt as written before the manifest had a format (head runs kept the feature spec in
    'backbone' and 'cache'; finetune runs had today's field names already)."""
    if obj["kind"] == "finetune":
        return dict(obj)
    cache = obj.get("cache") or {}
    features = {"backbone": obj.get("backbone"), "feature_dim": obj.get("feature_dim"),
                "fingerprint": cache.get("fingerprint"), "cache": cache.get("path")}
    return {"kind": "head", "class_names": obj.get("class_names"), "state_dict": obj["state_dict"],
            "recipe": obj.get("recipe", {}), "precision": cache.get("precision", "fp32"),
            "transform": cache.get("transform"), "decoder": cache.get("decoder", "pil"),
            "draft": bool(cache.get("draft", False)), "features": features}


def _torch_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_manifest(path: Path, manifest: RunManifest) -> None:
    atomic_write_bytes(path, _torch_bytes(manifest.to_payload()))


def load_manifest(run_dir: str | os.PathLike) -> RunManifest:
    """model.pt of a run folder (weights-only loading: a pickle payload is refused, never run)."""
    roll_forward(Path(run_dir))
    path = Path(run_dir) / MODEL
    return RunManifest.from_payload(load_weights_only(path, "model file"), str(path))


def load_metrics(run_dir: str | os.PathLike) -> dict:
    roll_forward(Path(run_dir))
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise NotARunFolder(f"{run_dir} is not a run folder (no metrics.json); train one with train-head or finetune")
    return json.loads(path.read_text())


def load_report(run_dir: str | os.PathLike) -> str:
    roll_forward(Path(run_dir))
    path = Path(run_dir) / REPORT
    if not path.is_file():
        raise NotARunFolder(f"{run_dir} has no report.txt; is it a run folder of train-head or finetune?")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotARunFolder(f"{path} is not UTF-8 text (byte {e.start}), so no run of this tool wrote it as it is "
                            "now; metrics.json holds the run's figures, or train the run again") from None


# --------------------------------------------------------------------------- finetune's checkpoint.pt


@dataclass
class FinetuneCheckpoint:
    """Everything an interrupted finetune needs to continue exactly (written after every epoch)."""

    epoch: int  # the last finished epoch
    model: dict
    optimizer: dict
    scheduler: dict
    scaler: dict
    history: list
    best_acc: float
    best_epoch: int
    best_state: dict
    best_preds: object  # torch.Tensor: val predictions of the best epoch
    seconds: float
    recipe: dict
    files_digest: str
    rng_torch: object  # torch.Tensor: torch's CPU RNG state
    format: str = field(default=CHECKPOINT_FORMAT)
    # {relative path: [size, mtime_ns]} of the files trained on; None in checkpoints made before it existed
    file_stats: dict | None = None

    def save(self, path: Path) -> None:
        atomic_write_bytes(path, _torch_bytes({f.name: getattr(self, f.name) for f in fields(self)}))

    @classmethod
    def load(cls, path: Path) -> FinetuneCheckpoint:
        obj = load_weights_only(path, "checkpoint")
        names = [f.name for f in fields(cls) if f.name != "format"]
        if not isinstance(obj, dict) or obj.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
            raise ModelFileError(f"{path} is not a finetune checkpoint this version can read; choose another --out")
        required = [f.name for f in fields(cls) if f.name != "format" and f.default is MISSING]
        missing = [k for k in required if k not in obj]
        if missing:
            raise ModelFileError(f"{path} is not a finetune checkpoint of this tool (missing {', '.join(missing)}); "
                                 "choose another --out")
        return cls(**{k: obj[k] for k in names if k in obj})


class CheckpointWriter:
    """Saves checkpoints on a background thread, one at a time, so the next epoch (or the run's final
    report and pictures) goes on while the last one is written: 135 MB for resnet18 take 0.7 s per epoch
    on a 2-core CPU. A checkpoint still lands whole or not at all (atomic rename); a failed write is
    raised by the next save() or by wait(); the thread is not a daemon, so Ctrl-C lets it finish. The
    price: a kill -9 in the first second of epoch k+1 can leave epoch k-1's checkpoint, so --resume
    repeats epoch k (with the same result: everything is seeded by epoch)."""

    def __init__(self, path: Path):
        self.path = path
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, ck: FinetuneCheckpoint) -> None:
        """ck must not be changed afterwards (give it copies of the live weights)."""
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(ck,), name="checkpoint-writer")
        self._thread.start()

    def _write(self, ck: FinetuneCheckpoint) -> None:
        try:
            ck.save(self.path)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


# --------------------------------------------------------------------------- one writer per run folder

def take_lock(folder: Path, label: str = "") -> ProcessLock:
    """The folder's writer lock (process-bound: it dies with its process, even under kill -9); label: who
    holds it ('audit'; runs leave it empty)."""
    try:
        return ProcessLock(folder / LOCK, label).acquire()
    except LockBusy as e:
        if e.same_process:
            raise RunFolderBusy(f"{folder} is being written by another run in this process; choose another --out") \
                from None
        who = "an audit" if e.holder.endswith(f"({AUDIT_LABEL})") else "another run"
        raise RunFolderBusy(f"{folder} is being written by {who} ({e.holder}); wait for it to finish or "
                            "choose another --out") from None


def _lock_label(folder: Path) -> str:
    """The label in a lock file ('' for a run's lock, or when it cannot be read)."""
    try:
        text = (folder / LOCK).read_text(errors="replace").strip()
    except OSError:
        return ""
    return text[text.rfind("(") + 1:-1] if text.endswith(")") else ""


def _apply_commit(folder: Path, staging_name: str = STAGING) -> None:
    """Move a committed staging folder's files into place (idempotent: a kill midway is finished later).
    Of the replaced files (the marker's "replaces": what the previous run or audit wrote) those not written
    again are removed; nothing else is touched. A marker of an earlier version has no "replaces": then the
    run-file names are the replaced run's, as that version assumed."""
    staging = folder / staging_name
    marker = json.loads((staging / COMMIT).read_text())
    written = marker["files"]
    for name in written:
        if (staging / name).exists():
            os.replace(staging / name, folder / name)
    for name in marker.get("replaces", RUN_FILES):  # the replaced run's files that this run did not write
        if name not in written:
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()
    fsync_dir(folder)
    shutil.rmtree(staging)


def commit_staged(folder: Path, staging_name: str, names: tuple[str, ...], before: dict) -> None:
    """The commit point of a staging folder: the files of `names` in it replace what `before` (stat_files at
    the start, under the lock) found; refused (FolderChanged, nothing replaced) when one of `names` appeared or
    changed in the folder since."""
    changed = changed_since(folder, names, before)
    if changed:
        raise FolderChanged(f"{', '.join(changed)} in {folder} appeared or changed while this command worked "
                            "(another program wrote them): nothing was saved and nothing replaced; move them away "
                            "and run it again")
    staging = folder / staging_name
    written = sorted(n for n in os.listdir(staging) if n in names)
    atomic_write_json(staging / COMMIT, {"files": written, "replaces": sorted(before)})  # the commit point
    _apply_commit(folder, staging_name)


def stat_files(folder: Path, names: tuple[str, ...]) -> dict:
    """{name: (inode, size, mtime_ns)} of the names present in folder (links not followed)."""
    out = {}
    for n in names:
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(folder / n)
            out[n] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def changed_since(folder: Path, names: tuple[str, ...], before: dict) -> list[str]:
    """Names that appeared, changed or went away since stat_files gave `before`."""
    now = stat_files(folder, names)
    return sorted(n for n in set(now) | set(before) if now.get(n) != before.get(n))


def _stale_temps(folder: Path) -> list[Path]:
    """Temp files (fsio.temp_name) of run files that a killed writer left: under the folder's lock no
    writer is running, and the name pattern is ours alone (hidden, run-file name, pid, 8 hex digits)."""
    names = (*RUN_FILES, CHECKPOINT, VERDICTS)
    pattern = re.compile(r"\.(?:%s)\.tmp-\d+-[0-9a-f]{8}" % "|".join(re.escape(n) for n in names))
    try:
        return [folder / n for n in os.listdir(folder) if pattern.fullmatch(n) and (folder / n).is_file()]
    except OSError:
        return []


def _recover(folder: Path) -> None:
    """Under the lock: finish a committed save, drop an uncommitted one and a killed writer's temp files
    (our own files only)."""
    for tmp in _stale_temps(folder):
        with contextlib.suppress(OSError):
            tmp.unlink()
    recover_staged(folder, STAGING)


def recover_staged(folder: Path, staging_name: str) -> None:
    """Under the lock: finish a committed staging folder, drop an uncommitted one."""
    staging = folder / staging_name
    if (staging / COMMIT).is_file():
        _apply_commit(folder, staging_name)
    elif staging.exists():
        shutil.rmtree(staging)


def roll_forward(folder: Path) -> None:
    """For readers: a save that was committed but not finished (a kill) is finished first."""
    if not (folder / STAGING / COMMIT).is_file():
        return
    with take_lock(folder):
        _recover(folder)


def _kind_in(folder: Path) -> str | None:
    """The kind of run the folder holds (None: no run). Refuses run-file names that no run wrote."""
    metrics = folder / METRICS
    if metrics.is_file():
        try:
            kind = json.loads(metrics.read_text()).get("kind")
        except (ValueError, AttributeError, UnicodeDecodeError):
            kind = None
        if kind not in KINDS:
            raise NotARunFolder(f"{folder} holds a metrics.json that no run of this tool wrote; choose another --out")
        return kind
    if (folder / CHECKPOINT).is_file():
        return "finetune"  # a finetune that has not finished yet
    if (folder / MODEL).is_file():
        return RunManifest.from_payload(load_weights_only(folder / MODEL, "model file"), str(folder / MODEL)).kind
    foreign = [n for n in RUN_FILES if (folder / n).exists()]
    if foreign:
        raise NotARunFolder(f"{folder} holds {', '.join(foreign)} but no run of this tool; a run would overwrite "
                            "them: choose another --out")
    return None


def _not_the_runs(folder: Path) -> list[str]:
    """Run-file names in the folder that its run did not write, by metrics.json's record of them: added or
    changed since. A run of an earlier version has no record: its run-file names are taken as its own. No
    metrics.json (a finetune that has not committed yet): no run file but a model.pt manifest is its own."""
    if not (folder / METRICS).exists():
        return [n for n in RUN_FILES if n != MODEL and os.path.lexists(folder / n)]
    try:
        record = json.loads((folder / METRICS).read_text()).get(FILES)
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return []
    if not isinstance(record, dict):
        return []
    return [n for n in RUN_FILES
            if n != METRICS and os.path.lexists(folder / n) and not unchanged(folder / n, record.get(n))]


KIND_WORDS = {"head": "a train-head run", "finetune": "a finetune run"}


def check_run_folder(out: str | os.PathLike, kind: str) -> None:
    """Refuse to write a run of `kind` into a folder that holds the other kind (or foreign run files)."""
    check_output_path(out, own_kind=kind)
    folder = Path(out)
    if not folder.is_dir():
        return
    found = _kind_in(folder)
    if found is not None and found != kind:
        raise RunKindMismatch(f"{folder} holds {KIND_WORDS[found]}; a {kind} run would mix two kinds of runs in "
                              "one folder: choose another --out")
    foreign = _not_the_runs(folder) if found else []
    if foreign:
        raise NotARunFolder(f"{folder} holds {', '.join(foreign)}, which its run did not write (added or changed "
                            "since); a run would replace or remove them: move them away or choose another --out")


class InsideRunFolder(RunFolderError):
    """An output path that is a run folder another command does not own, lies inside one, or names its file."""


def _manifest_like(path: Path) -> bool:
    """model.pt written by this tool: a torch zip whose pickle names a tlearn format (tensors are not read)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl")), None)
            return pkl is not None and any(t in z.read(pkl) for t in (FORMAT.encode(), CHECKPOINT_FORMAT.encode()))
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def is_run_folder(folder: str | os.PathLike) -> bool:
    """A folder that holds a run of this tool, finished, unfinished (checkpoint.pt, staging) or being written
    (lock): metrics.json of a run's kind, checkpoint.pt, the staging folder or lock, or a model.pt manifest."""
    d = Path(folder)
    try:
        if not d.is_dir():
            return False
        if (d / STAGING).is_dir() or (d / CHECKPOINT).is_file():
            return True
        if (d / LOCK).is_file() and _lock_label(d) != AUDIT_LABEL:
            return True
        if (d / METRICS).is_file():
            with contextlib.suppress(ValueError, AttributeError, UnicodeDecodeError):
                if json.loads((d / METRICS).read_text()).get("kind") in KINDS:
                    return True
        return (d / MODEL).is_file() and _manifest_like(d / MODEL)
    except OSError:
        return False


def run_folder_holding(path: str | os.PathLike, include_self: bool = True) -> Path | None:
    """The run folder that `path` is (include_self), lies inside, or names a file of; None when there is none.
    Symlinks are followed, so a link into a run folder is found as well."""
    p = Path(os.path.abspath(path))
    with contextlib.suppress(OSError, RuntimeError):
        p = p.resolve()
    for folder in ([p] if include_self else []) + list(p.parents):
        if is_run_folder(folder):
            return folder
    return None


def check_output_path(out: str | os.PathLike, flag: str = "--out", own_kind: str | None = None) -> None:
    """Refuse, before any work, an output path inside a run folder that this command does not own.
    own_kind None (audit, export, preview): the path may be neither a run folder nor inside one. own_kind
    'head'/'finetune' (train-head, run, finetune): the path may be a run folder (its own rules then apply:
    check_run_folder), never inside another one."""
    run = run_folder_holding(out, include_self=own_kind is None)
    if run is None:
        return
    target = Path(os.path.abspath(out))
    with contextlib.suppress(OSError, RuntimeError):
        target = target.resolve()
    where = "is the run folder" if target == run else "lies inside the run folder"
    raise InsideRunFolder(f"{flag} {out} {where} {run}; a run folder's files belong to its run: "
                          f"choose a path outside it")


def is_exported_program(path: Path) -> bool:
    """A program `export` wrote: a torch.export archive (zip) holding the class names as its extra file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            extra = next((n for n in names if n.endswith("/extra/class_names.json") and n.count("/") == 2), None)
            if extra is None or f"{extra.split('/')[0]}/archive_format" not in names:
                return False
            classes = json.loads(z.read(extra))
    except (OSError, zipfile.BadZipFile, ValueError, UnicodeDecodeError):
        return False
    return isinstance(classes, list) and all(isinstance(c, str) for c in classes)


def check_output_file(out: str | os.PathLike, is_own: Callable[[Path], bool], what: str, flag: str = "--out") -> None:
    """Before any work: out is a new file, or `what` that this tool wrote earlier (is_own says so), never a
    user's file, nor a link (the atomic rename would replace the link), nor a run folder's file."""
    check_output_path(out, flag)
    p = Path(out)
    if not os.path.lexists(p):
        return
    if p.is_symlink():
        raise ForeignOutput(f"{flag} {out} is a symbolic link; writing would replace the link: name another path")
    if not p.is_file():
        raise ForeignOutput(f"{flag} {out} exists and is not a file; name another path")
    if not is_own(p):
        raise ForeignOutput(f"{flag} {out} exists and is not {what}; it would be overwritten: name another path, "
                            "or remove the file first")


class RunFolder:
    """Held for a whole run: `with RunFolder(out, kind) as rf: ... rf.commit(...)`."""

    def __init__(self, out: str | os.PathLike, kind: str):
        self.path = Path(out)
        self.kind = kind
        self._lock: ProcessLock | None = None
        self._before: dict = {}  # stat_files of the run files found at the start (the previous run's)
        self._checkpoints = CheckpointWriter(self.path / CHECKPOINT)

    def __enter__(self) -> RunFolder:
        check_output_path(self.path, own_kind=self.kind)  # never a run folder inside another run's folder
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = take_lock(self.path)
        try:
            _recover(self.path)
            check_run_folder(self.path, self.kind)
            self._before = stat_files(self.path, RUN_FILES)
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:  # a checkpoint still being written lands (or fails) before the folder is unlocked
            self._checkpoints.wait()
        except BaseException as e:
            if exc_type is None:
                raise
            # the run is failing already: its own error is the one to raise; say what else went wrong
            print(f"also, the last checkpoint was not written: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            try:
                staging = self.path / STAGING
                if staging.exists() and not (staging / COMMIT).is_file():
                    shutil.rmtree(staging)  # an unfinished save of this run: the previous run stays as it was
            finally:
                self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def save_checkpoint(self, ck: FinetuneCheckpoint) -> None:
        """Written in the background (CheckpointWriter); the commit point waits for it."""
        self._checkpoints.save(ck)

    def commit(self, manifest: RunManifest, metrics: dict, report: str,
               pictures: Callable[[Path], Callable[[], list[str]] | None] | None = None) -> list[str]:
        """Write the run's files, all or nothing; returns the notes of pictures not drawn. pictures(folder)
        prepares the drawing into the folder it is given and returns wait() -> notes (None: drawn already),
        called once model.pt, metrics.json and report.txt are written, so a picture cannot cost the model."""
        if manifest.kind != self.kind:
            raise RunKindMismatch(f"a {manifest.kind} manifest cannot be saved as a {self.kind} run")
        staging = self.path / STAGING
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        wait = pictures(staging) if pictures is not None else None
        save_manifest(staging / MODEL, manifest)
        try:
            json.dumps(metrics, allow_nan=False)
        except ValueError as e:
            raise PipelineError(f"the metrics of this run hold NaN or infinity ({e}); nothing was saved") from None
        atomic_write_bytes(staging / REPORT, report.encode())
        notes = wait() if wait is not None else []
        # what this run wrote, for the next run into the folder: it replaces or removes these files only
        files = {n: file_record(staging / n) for n in sorted(os.listdir(staging)) if n in RUN_FILES}
        atomic_write_json(staging / METRICS, {**metrics, FILES: files})
        self._checkpoints.wait()  # the last epoch's checkpoint is in place before the run counts as saved
        commit_staged(self.path, STAGING, RUN_FILES, self._before)
        return notes


def save_run(out: str | os.PathLike, manifest: RunManifest, metrics: dict, report: str,
             pictures: Callable[[Path], Callable[[], list[str]] | None] | None = None) -> Path:
    """Lock, write and commit a whole run folder in one go (for callers that train outside the lock)."""
    with RunFolder(out, manifest.kind) as rf:
        rf.commit(manifest, metrics, report, pictures)
    return Path(out)
