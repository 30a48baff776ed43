"""Predict with a run folder: rebuild the model from model.pt alone, classify image files."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from . import PipelineError
from .backbones import BackboneSpec, build_backbone, file_sha256, last_linear_name, load_weights_into, replace_module
from .data import BadImage, load_rgb, scan_files
from .runfolder import load_model_file
from .runtime import resolve_device, resolve_runtime


class HeadClassifier(nn.Module):
    """Frozen backbone features -> the trained Linear head (a head run as one module)."""

    def __init__(self, features: nn.Module, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.features = features
        self.head = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True):
        # an exported program keeps its export-time mode and refuses train()/eval()
        self.training = mode
        self.head.train(mode)
        if not isinstance(self.features, torch.fx.GraphModule):
            self.features.train(mode)
        return self


def _head_backbone(spec: dict) -> nn.Module:
    """The backbone recorded in a head run's model.pt, checked against the recorded weights digest."""
    if spec["kind"] == "program":
        path = spec["path"]
        if not os.path.isfile(path) or file_sha256(path) != spec["weights_digest"]:
            raise PipelineError(f"this run was trained on features of the program {path}, which is missing or "
                                "changed; put the same .pt2 file back at that path")
        return build_backbone(BackboneSpec(path, "program")).module
    weights = spec["weights"]
    try:
        bb = build_backbone(BackboneSpec(spec["backbone"], weights, spec.get("seed", 0)))
    except PipelineError as e:
        raise PipelineError(f"this run was trained on features of {spec['backbone']} with weights {weights}, which "
                            f"are not available here: {e}") from None
    if bb.weights_digest != spec["weights_digest"]:
        raise PipelineError(f"the weights {weights} for {spec['backbone']} differ from those the run was trained on "
                            "(content hash mismatch); predictions would be meaningless")
    return bb.module


def load_classifier(run_dir: str | os.PathLike) -> tuple[nn.Module, list[str], dict]:
    """(model mapping normalised N x 3 x 224 x 224 to logits, class names, model.pt contents)."""
    m = load_model_file(run_dir)
    if m["kind"] == "head":
        model = HeadClassifier(_head_backbone(m["backbone"]), m["state_dict"]["weight"], m["state_dict"]["bias"])
    elif m["kind"] == "finetune":
        model = torchvision.models.get_model(m["arch"], weights=None)
        head = m.get("head") or last_linear_name(model)
        replace_module(model, head, nn.Linear(model.get_submodule(head).in_features, len(m["class_names"])))
        load_weights_into(model, m["state_dict"], f"{Path(run_dir) / 'model.pt'}", None)
    else:
        raise PipelineError(f"{run_dir}/model.pt has unknown kind {m['kind']!r}")
    if not isinstance(model, torch.fx.GraphModule):
        model.eval()
    return model, m["class_names"], m


@dataclass
class Prediction:
    path: str
    label: str | None = None
    probability: float | None = None
    probabilities: dict | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        d = {"path": self.path, "class": self.label, "probability": self.probability,
             "probabilities": self.probabilities, "error": self.error}
        return {k: v for k, v in d.items() if v is not None}


def predict(run_dir: str, inputs: list[str], device: str = "auto", batch_size: int = 32) -> list[Prediction]:
    """One Prediction per input image (in the order given, folders sorted); bad files carry an error."""
    model, classes, meta = load_classifier(run_dir)
    # predict under the precision the run's features were made with (fp16 exists on CUDA only)
    recorded = meta.get("precision") or meta.get("cache", {}).get("precision", "fp32")
    on_cpu = resolve_device(device).type == "cpu"
    rt = resolve_runtime(device, "fp32" if (recorded == "fp16" and on_cpu) else recorded)
    model = model.to(rt.device)
    files, skipped = scan_files(inputs)
    decode = _decoder(meta.get("cache", {}), rt.device)  # decode as the run's features were made
    results: list[Prediction] = []
    for s in range(0, len(files), batch_size):  # one batch in memory at a time, whatever the folder size
        chunk = files[s:s + batch_size]
        x, reasons = decode(chunk)
        probs = iter([])
        if len(x):
            with torch.inference_mode(), rt.autocast():
                probs = iter(torch.softmax(model(x.to(rt.device)).float(), 1).cpu())
        for f, reason in zip(chunk, reasons):
            if reason:
                results.append(Prediction(str(f), error=reason))
                continue
            p = next(probs)
            k = int(p.argmax())
            results.append(Prediction(str(f), classes[k], float(p[k]), {c: float(v) for c, v in zip(classes, p)}))
    return results + [Prediction(p, error=r) for p, r in skipped]


def _decoder(cache_meta: dict, device: torch.device):
    """files -> (good images as one normalised batch on device, reason per file ('' when used)), with the
    preprocessing spec the run's features were made with (rebuilt from its record in model.pt)."""
    from .data import normalize_batch, pil_to_uint8, resize_crop_pil
    from .preprocess import Preprocess

    spec = Preprocess.from_record(cache_meta.get("transform"), cache_meta.get("draft", False),
                                  cache_meta.get("decoder", "pil"))
    if spec.decoder == "torchvision":
        from .device_decode import finish_batch, read_for_device

        return lambda files: finish_batch([read_for_device(str(f), spec.exif) for f in files], device, spec)
    draft = (spec.resize, spec.resize) if spec.draft else None

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
    width = max([len(p.path) for p in preds] + [4])
    lines = [f"{'path':<{width}}  {'class':<12}  probability"]
    for p in preds:
        if p.error:
            lines.append(f"{p.path:<{width}}  ERROR: {p.error}")
        else:
            lines.append(f"{p.path:<{width}}  {p.label:<12}  {p.probability:.4f}")
    return "\n".join(lines)


class ProbabilityProgram(nn.Module):
    """What `export` traces: images in [0, 1] (N x 3 x 224 x 224, after Resize 256 + CenterCrop 224)
    -> normalised -> model -> softmax class probabilities."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model((images - self.mean) / self.std), dim=1)


def export_program(run_dir: str, out: str | os.PathLike, crop: int = 224) -> dict:
    """torch.export the run's classifier to a .pt2 file (image batch -> probabilities)."""
    from .data import IMAGENET_MEAN, IMAGENET_STD

    model, classes, _ = load_classifier(run_dir)
    module = ProbabilityProgram(model, IMAGENET_MEAN, IMAGENET_STD).eval()
    example = torch.rand(2, 3, crop, crop)
    try:  # AUTO: a dynamic batch within whatever range the model allows (a user's .pt2 backbone may bound it)
        prog = torch.export.export(module, (example,), dynamic_shapes={"images": {0: torch.export.Dim.AUTO}})
    except Exception as e:
        raise PipelineError(f"torch.export failed for {run_dir}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import json

    torch.export.save(prog, str(out), extra_files={"class_names.json": json.dumps(classes)})
    return {"path": str(out), "class_names": classes}
