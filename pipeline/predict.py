"""Predict with a run folder: rebuild the model from model.pt alone, classify image files."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import PipelineError
from .backbones import TIMM_PREFIX, Backbone, BackboneSpec, architecture, build_backbone, file_sha256, last_linear_name, \
    load_weights_into, materialize_counters, replace_module
from .data import IMG_EXTENSIONS, BadImage, load_rgb, scan_files
from .preprocess import Preprocess
from .progress import Progress
from .runfolder import ModelFileError, RunManifest, load_manifest
from .runtime import PRECISIONS, resolve_device, resolve_runtime
from .text import printable


class HeadClassifier(nn.Module):
    """Frozen backbone features -> the trained Linear head (a head run as one module)."""

    def __init__(self, features: nn.Module, weight: torch.Tensor, bias: torch.Tensor,
                 novelty: "NoveltyScore | None" = None):
        super().__init__()
        self.features = features
        self.head = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)
        self.novelty = novelty

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, novelty per image or None when the run has no novelty model): one backbone pass."""
        f = self.features(x)
        return self.head(f), (self.novelty(f) if self.novelty is not None else None)

    def train(self, mode: bool = True):
        # an exported program keeps its export-time mode and refuses train()/eval()
        self.training = mode
        self.head.train(mode)
        if not isinstance(self.features, torch.fx.GraphModule):
            self.features.train(mode)
        return self


class NoveltyScore(nn.Module):
    """Backbone features -> novelty (novelty.NoveltyModel.score as a module, for predict and export): how
    unlike the run's training photos each image is; above the run's threshold it is called unknown."""

    def __init__(self, m):
        super().__init__()
        for k in ("basis", "class_means", "whiten", "global_mean", "global_whiten"):
            self.register_buffer(k, torch.as_tensor(getattr(m, k), dtype=torch.float64))
        self.in_span = m.basis.size > 0  # train's span (fewer rows than features) or all of R^D
        self.center, self.scale, self.weight, self.ridge = (float(m.center), float(m.scale), float(m.relative_weight),
                                                            float(m.ridge))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        z = f.double()
        z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if self.in_span:
            p = z @ self.basis
            outside = (1.0 - (p * p).sum(1)).clamp_min(0.0)
        else:
            p, outside = z, torch.zeros_like(z[:, 0])
        a = p @ self.whiten
        d2 = (a * a).sum(1, keepdim=True) - 2 * a @ self.class_means.T + (self.class_means ** 2).sum(1)[None]
        g = p @ self.global_whiten - self.global_mean
        raw = d2.min(1).values - self.weight * (g * g).sum(1) + (1 - self.weight) * outside / self.ridge
        return ((raw - self.center) / self.scale).float()


def _head_backbone(spec: dict, crop: int) -> Backbone:
    """The backbone recorded in a head run's model.pt, checked against the recorded weights digest."""
    if spec.get("kind") == "program":
        path = spec["path"]
        if not os.path.isfile(path) or file_sha256(path) != spec["weights_digest"]:
            raise PipelineError(f"this run was trained on features of the program {path}, which is missing or "
                                "changed; put the same .pt2 file back at that path")
        return build_backbone(BackboneSpec(path, "program"), crop)
    weights = spec["weights"]
    try:
        bb = build_backbone(BackboneSpec(spec["backbone"], weights, spec.get("seed", 0)), crop)
    except PipelineError as e:
        raise PipelineError(f"this run was trained on features of {spec['backbone']} with weights {weights}, which "
                            f"are not available here: {e}") from None
    if bb.weights_digest != spec["weights_digest"]:
        raise PipelineError(f"the weights {weights} for {spec['backbone']} differ from those the run was trained on "
                            "(content hash mismatch); predictions would be meaningless")
    return bb


def _spec_problems(m: RunManifest) -> tuple[Preprocess | None, list[str]]:
    """(the preprocessing the run's model saw, or None; what is wrong with model.pt's fields beyond what
    the manifest checks itself: each problem in a few words)."""
    problems = []
    if len(set(m.class_names)) != len(m.class_names):
        problems.append("class_names names a class twice")
    if m.precision not in PRECISIONS or m.precision == "auto":
        problems.append(f"its precision {printable(repr(m.precision))} is not one of fp32, bf16, fp16")
    spec = None
    try:
        spec = Preprocess.from_record(m.transform, m.draft, m.decoder)
    except (PipelineError, TypeError, ValueError) as e:
        problems.append(f"its preprocessing spec is not usable ({printable(str(e))[:160]})")
    if spec is not None:
        if not all(math.isfinite(v) for v in spec.mean + spec.std):
            problems.append("its preprocessing mean or std is not a finite number")
        if type(spec.resize) is not int or type(spec.crop) is not int:
            problems.append("its preprocessing resize and crop are not integers")
        if (spec.decoder, bool(spec.draft)) != (m.decoder, bool(m.draft)):  # the spec holds the draft's margin
            problems.append(f"its decoder {printable(repr(m.decoder))} and draft {m.draft!r} disagree with its "
                            f"preprocessing spec ({spec.decoder}, draft {bool(spec.draft)})")
    return spec, problems + (_head_problems(m) if m.kind == "head" else [])


def _head_problems(m: RunManifest) -> list[str]:
    w, bb, problems = m.state_dict["weight"], m.backbone, []
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (w, m.state_dict["bias"])):
        problems.append("the head's weight and bias are not float tensors")
    dim = m.features.get("feature_dim")
    if dim is not None and (type(dim) is not int or dim != w.shape[1]):
        problems.append(f"the head takes {w.shape[1]} features, its record of the features says "
                        f"{printable(repr(dim))}")
    want = {"program": ("path", "weights_digest")}.get(bb.get("kind"), ("backbone", "weights", "weights_digest"))
    if bb.get("kind") not in (None, "torchvision", "program", "package", "timm"):
        problems.append(f"its backbone kind {printable(repr(bb.get('kind')))} is unknown")
    elif not all(isinstance(bb.get(k), str) for k in want):
        problems.append(f"its backbone record lacks {', '.join(k for k in want if not isinstance(bb.get(k), str))}")
    elif bb.get("kind") != "program" and type(bb.get("seed", 0)) is not int:
        problems.append(f"its backbone seed {printable(repr(bb.get('seed')))} is not an integer")
    return problems


@dataclass
class LoadedRun:
    model: nn.Module  # normalised N x 3 x crop x crop images -> logits
    class_names: list[str]
    manifest: RunManifest
    preprocess: Preprocess  # what turns a file into the model's input (as the run's features were made)
    novelty_threshold: float | None = None  # above it a photo is unknown; None: the run has no novelty model
    novelty_note: str = ""  # why a run has none (said once by predict)


def load_classifier(run_dir: str | os.PathLike) -> LoadedRun:
    """The run's classifier rebuilt from model.pt alone, its fields checked against each other and against
    the backbone first (predict and export both load through here): a tampered or damaged file is one
    line naming each problem, never a traceback."""
    m = load_manifest(run_dir)
    source = f"{Path(run_dir) / 'model.pt'}"
    spec, problems = _spec_problems(m)
    if problems:
        raise ModelFileError(f"{source} is not a usable model file: {'; '.join(problems)}; retrain the run")
    if m.kind == "head":  # a calibrated run's temperature divides the logits: folded into the layer
        t, w = m.temperature or 1.0, m.state_dict["weight"]
        bb = _head_backbone(m.backbone, spec.crop)
        if bb.feature_dim != w.shape[1]:
            raise ModelFileError(f"{source} is not a usable model file: the head takes {w.shape[1]} features, its "
                                 f"backbone gives {bb.feature_dim}; retrain the run")
        nov = _novelty_model(m, bb.feature_dim, source)
        model = HeadClassifier(bb.module, w.float() / t, m.state_dict["bias"].float() / t,
                               NoveltyScore(nov) if nov is not None else None)
        threshold = nov.threshold if nov is not None else None
        note = "" if nov is not None else NO_NOVELTY_OLD
    else:
        model, threshold, note = _finetuned_model(m, source), None, NO_NOVELTY_FINETUNE
    if not isinstance(model, torch.fx.GraphModule):
        model.eval()
    return LoadedRun(model, m.class_names, m, spec, threshold, note)


NO_NOVELTY_OLD = ("note: this run has no novelty model (made before novelty scores, or train was too small): photos "
                  "of none of its classes are not told apart; train the head again to get them")
NO_NOVELTY_FINETUNE = ("note: finetune runs have no novelty model: photos of none of the classes are not told apart "
                       "(a head run, extract + train-head, scores novelty)")


def _novelty_model(m: RunManifest, feature_dim: int, source: str):
    from .novelty import NoveltyRecordError, from_record

    try:
        return from_record(m.novelty, feature_dim, len(m.class_names))
    except NoveltyRecordError as e:
        raise ModelFileError(f"{source} is not a usable model file: {e}; retrain the run") from None


def _finetuned_model(m: RunManifest, source: str) -> nn.Module:
    try:
        model = architecture(m.arch, meta=True)  # a layout: every weight comes from model.pt
    except ValueError:
        raise PipelineError(f"{source} names the architecture {m.arch!r}, which this torchvision does not "
                            "have") from None
    head = m.head or last_linear_name(model)
    if m.arch.startswith(TIMM_PREFIX):  # the classifier finetune made, the timm way (its default may be none)
        from .timm_backbone import reset_for

        with torch.device("meta"):
            reset_for(model, len(m.class_names), 0)
    else:
        try:
            in_features = model.get_submodule(head).in_features
        except AttributeError:
            raise ModelFileError(f"{source} is not a usable model file: {printable(repr(head))} is not a linear "
                                 f"layer of {m.arch}; retrain the run") from None
        replace_module(model, head, nn.Linear(in_features, len(m.class_names), device="meta"))
    load_weights_into(model, m.state_dict, source, None, assign=True)
    materialize_counters(model)
    return model


UNSURE = "unsure"  # what a prediction below --min-confidence is labelled (table, JSON, sort folder)
UNKNOWN = "unknown"  # what a photo above the run's novelty threshold is labelled (table, JSON, sort folder)


@dataclass
class Prediction:
    path: str
    label: str | None = None  # the most probable class (also when unsure)
    probability: float | None = None
    probabilities: dict | None = None
    error: str | None = None
    unsure: bool = False  # probability below the asked minimum confidence: left to a person
    source: str | None = None  # the file read (path resolved once, when given so): what a sort places
    novelty: float | None = None  # higher = less like the training photos (None: the run has no novelty model)
    unknown: bool = False  # novelty above the threshold: a photo of none of the classes, most likely

    @property
    def shown_class(self) -> str | None:
        """The class to act on: `unknown` above the novelty threshold, else `unsure` below the minimum
        confidence (label keeps the best guess either way)."""
        return UNKNOWN if self.unknown else UNSURE if self.unsure else self.label

    def as_dict(self) -> dict:
        d = {"path": self.path, "class": self.shown_class, "probability": self.probability,
             "probabilities": self.probabilities, "novelty": self.novelty, "error": self.error}
        if self.unknown:  # a class really named "unknown" stays told apart by the flag
            d.update(unknown=True, best_guess=self.label)
        elif self.unsure:  # likewise for "unsure"
            d.update(unsure=True, best_guess=self.label)
        return {k: v for k, v in d.items() if v is not None}


class NoImagesError(PipelineError):
    """predict was given only folders without any file."""


def input_entries(inputs: list[str]) -> list[tuple[Path | str, str]]:
    """(path, reason it cannot be used or '') of every file the inputs name, in the order given (a folder's
    files sorted in its place), usable and unusable alike."""
    entries: list[tuple[Path | str, str]] = []
    for item in inputs:
        files, skipped = scan_files([item])
        entries += sorted([(f, "") for f in files] + list(skipped), key=lambda e: Path(e[0]))
    return entries


def predict(run_dir: str, inputs: list[str], device: str = "auto", batch_size: int = 32,
            progress: Progress | None = None, min_confidence: float = 0.0,
            entries: list[tuple] | None = None, max_novelty: float | None = None) -> list[Prediction]:
    """One Prediction per input image, in the order given (folders sorted in place); bad files carry an error.
    A prediction whose probability is below min_confidence is marked unsure; one whose novelty is above
    max_novelty (default: the run's own threshold) is marked unknown. entries: the files already
    listed by input_entries, (path, reason) (by default the inputs are scanned here), or (path, reason,
    source) with the file to read resolved (sorting.unique_entries): each prediction keeps its source."""
    progress = progress or Progress()
    run = load_classifier(run_dir)
    classes, precision = run.class_names, run.manifest.precision
    # predict under the precision the run's features were made with (fp16 exists on CUDA only)
    on_cpu = resolve_device(device).type == "cpu"
    rt = resolve_runtime(device, "fp32" if (precision == "fp16" and on_cpu) else precision)
    model = run.model.to(rt.device)
    entries = input_entries(inputs) if entries is None else entries
    if not entries:  # only empty folders: a table with a header and no rows would read as success
        raise NoImagesError(f"no images found in {', '.join(map(str, inputs))} (looked for "
                            f"{', '.join(IMG_EXTENSIONS)}); name image files or folders that hold some")
    if random_weights_note(run.manifest):  # one line on stderr (the table or JSON stays alone on stdout)
        progress.log(random_weights_note(run.manifest))
    if run.novelty_note:
        progress.log(run.novelty_note)
    limit = run.novelty_threshold if max_novelty is None else max_novelty
    decode = _decoder(run.preprocess, rt.device)  # decode as the run's features were made
    sources = [e[2] if len(e) > 2 else None for e in entries]
    results = [Prediction(str(e[0]), error=e[1], source=src) if e[1] else None for e, src in zip(entries, sources)]
    todo = [i for i, r in enumerate(results) if r is None]
    progress.start(len(todo), "predict")
    for s in range(0, len(todo), batch_size):  # one batch in memory at a time, whatever the folder size
        chunk = todo[s:s + batch_size]
        x, reasons = decode([sources[i] or entries[i][0] for i in chunk])
        probs, novelty = _scores(model, x, rt)
        for i, reason in zip(chunk, reasons):
            results[i] = _prediction(str(entries[i][0]), reason, None if reason else next(probs), classes)
            nov = None if reason else next(novelty)
            if results[i].error is None:
                results[i].unsure = results[i].probability < min_confidence
                if nov is not None and math.isfinite(nov):
                    results[i].novelty = nov
                    results[i].unknown = nov > limit
            results[i].source = sources[i]
        progress.update(len(chunk))
    progress.close()
    return results


def _scores(model: nn.Module, x: torch.Tensor, rt):
    """(iterator of probability rows, iterator of novelty numbers or of None) for one decoded batch."""
    if not len(x):
        return iter([]), iter([])
    with torch.inference_mode(), rt.autocast():
        if isinstance(model, HeadClassifier):
            logits, novelty = model.scores(x.to(rt.device))
        else:
            logits, novelty = model(x.to(rt.device)), None
        probs = torch.softmax(logits.float(), 1).cpu()
    return iter(probs), iter(novelty.cpu().tolist() if novelty is not None else [None] * len(probs))


def random_weights_note(m: RunManifest) -> str:
    """One line for a run made on random backbone weights (--weights none): its predictions are likely near
    chance ('' for any other run)."""
    weights = (m.features or {}).get("backbone", {}).get("weights") if m.kind == "head" else m.recipe.get("weights")
    if weights != "none":
        return ""
    return ("WARNING: this run was trained on random backbone weights (--weights none): its predictions are likely "
            "near chance; retrain with ImageNet weights (--weights imagenet, or --backbone efficientnet_lite0 offline)")


def _prediction(path: str, reason: str, p: torch.Tensor | None, classes: list[str]) -> Prediction:
    if reason:
        return Prediction(path, error=reason)
    if not bool(torch.isfinite(p).all()):  # never a class picked from NaN (nor bare NaN in --json)
        return Prediction(path, error="the model gave NaN or infinite scores for this image")
    k = int(p.argmax())
    return Prediction(path, classes[k], float(p[k]), {c: float(v) for c, v in zip(classes, p)})


def _decoder(spec: Preprocess, device: torch.device):
    """files -> (good images as one normalised batch on device, reason per file ('' when used)), with the
    preprocessing spec the run's features were made with (rebuilt from its record in model.pt)."""
    from .data import normalize_batch, pil_to_uint8, resize_crop_pil

    if spec.decoder == "torchvision":
        from .device_decode import finish_batch, read_for_device

        return lambda files: finish_batch([read_for_device(str(f), spec.exif, spec) for f in files], device, spec)
    draft = spec.draft_size()

    def decode(files):
        xs, reasons = [], []
        for f in files:
            try:
                xs.append(pil_to_uint8(resize_crop_pil(load_rgb(f, draft=draft, exif=spec.exif), spec)))
                reasons.append("")
            except BadImage as e:
                reasons.append(str(e))
        x = torch.stack(xs) if xs else torch.zeros(0, 3, spec.crop, spec.crop, dtype=torch.uint8)
        return normalize_batch(x.to(device), spec), reasons

    return decode


def format_table(preds: list[Prediction]) -> str:
    """One row per prediction; names are printed escaped, so a file or class name with a newline or a
    terminal escape code can neither break the table nor control the terminal."""
    paths = [printable(p.path) for p in preds]
    width = max([len(p) for p in paths] + [4])
    novelty = any(p.novelty is not None for p in preds)
    lines = [f"{'path':<{width}}  {'class':<12}  probability" + ("  novelty" if novelty else "")]
    for p, path in zip(preds, paths):
        if p.error:
            lines.append(f"{path:<{width}}  ERROR: {printable(p.error)}")
            continue
        prob = f"{p.probability:<11.4f}" if novelty else f"{p.probability:.4f}"
        nov = f"  {p.novelty:>7.2f}" if p.novelty is not None else ("  " + "-".rjust(7) if novelty else "")
        guess = f"  (best guess: {printable(p.label)})" if (p.unsure or p.unknown) else ""
        lines.append(f"{path:<{width}}  {printable(p.shown_class):<12}  {prob}{nov}{guess}")
    return "\n".join(lines)


class ProbabilityProgram(nn.Module):
    """What `export` traces: images in [0, 1] (N x 3 x crop x crop, after the run's Resize and CenterCrop:
    256 and 224 by default) -> normalised by the run's mean and std -> model -> softmax class probabilities;
    a head run with a novelty model returns (probabilities, novelty (N,)) (above the threshold recorded in
    the program's novelty.json: unknown)."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.with_novelty = isinstance(model, HeadClassifier) and model.novelty is not None
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor):
        x = (images - self.mean) / self.std
        if self.with_novelty:
            logits, novelty = self.model.scores(x)
            return torch.softmax(logits, dim=1), novelty
        return torch.softmax(self.model(x), dim=1)


def program_of(run_dir: str) -> tuple[LoadedRun, ProbabilityProgram, torch.Tensor]:
    """(the run, its ProbabilityProgram in eval mode, an example batch of 2 images in [0, 1]): what both
    exports (.pt2 and .onnx) trace."""
    run = load_classifier(run_dir)
    spec = run.preprocess
    module = ProbabilityProgram(run.model, spec.mean, spec.std).eval()
    return run, module, torch.rand(2, 3, spec.crop, spec.crop)


def export_run(run_dir: str, out: str | os.PathLike) -> dict:
    """`export`: a .pt2 torch.export program or an .onnx model, chosen by out's suffix. A run folder's file or
    a user's existing file is refused as such first (the more important news), whatever its suffix."""
    from .runfolder import check_output_file, check_output_path

    suffix = Path(out).suffix.lower()
    check_output_path(out)
    if suffix not in (".pt2", ".onnx") and os.path.lexists(out):
        check_output_file(out, lambda p: False, "a program exported by this tool")
    if suffix == ".onnx":
        from .onnx_export import export_onnx

        return export_onnx(run_dir, out)
    if suffix != ".pt2":
        raise ExportFormatError(f"--out {out}: the file name must end in .pt2 (a torch.export program) or .onnx "
                                "(an ONNX model)")
    return export_program(run_dir, out)


class ExportFormatError(PipelineError):
    """export's --out names neither a .pt2 nor an .onnx file."""


def export_program(run_dir: str, out: str | os.PathLike) -> dict:
    """torch.export the run's classifier to a .pt2 file (image batch -> probabilities), with the preprocessing
    predict uses (the run's recorded spec: its crop, mean and std; the spec goes into the file as
    preprocess.json beside class_names.json). Returns {path, class_names, preprocess}."""
    import json

    from .fsio import atomic_output
    from .runfolder import check_output_file, is_exported_program

    # never a run folder's file (export RUN --out RUN/model.pt replaced its manifest), nor a user's file
    check_output_file(out, is_exported_program, "a program exported by this tool")
    run, module, example = program_of(run_dir)
    spec = run.preprocess
    try:  # AUTO: a dynamic batch within whatever range the model allows (a user's .pt2 backbone may bound it)
        prog = torch.export.export(module, (example,), dynamic_shapes={"images": {0: torch.export.Dim.AUTO}})
    except Exception as e:
        raise PipelineError(f"torch.export failed for {run_dir}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    out = Path(out)
    extra = {"class_names.json": json.dumps(run.class_names), "preprocess.json": json.dumps(spec.to_json())}
    if module.with_novelty:  # the second output's threshold, as predict uses it
        extra["novelty.json"] = json.dumps({"threshold": run.novelty_threshold, "output": 1,
                                            "meaning": "higher = less like the training photos; above threshold: unknown"})
    try:  # a temp file renamed over the target: a full disk or a kill never leaves a truncated program there
        with atomic_output(out, suffix=out.suffix) as tmp:
            torch.export.save(prog, str(tmp), extra_files=extra)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports OS failures as RuntimeError
        raise PipelineError(f"cannot write {out}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    return {"path": str(out), "class_names": run.class_names, "preprocess": spec,
            "novelty_threshold": run.novelty_threshold if module.with_novelty else None}
