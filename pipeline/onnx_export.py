"""`export RUN --out F.onnx`: the run's classifier as an ONNX model, the same program as the .pt2 export
(predict.ProbabilityProgram): float32 images in [0, 1], N x 3 x crop x crop with N free -> calibrated class
probabilities (N x classes), and for a head run with a novelty model the novelty (N,) as a second output.
The class names, the preprocessing spec and the novelty threshold are the model's metadata_props.

Written by torch's ONNX exporter (torch.onnx.export, dynamo) at opset OPSET; onnx (and onnxscript, which
the exporter uses) are imported only here: the `onnx` extra.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import PipelineError

OPSET = 18  # ONNX Runtime >= 1.14 runs it
MARK = "tlearn.export"  # the metadata key that says this tool wrote the file (value: the format version)
FORMAT_VERSION = "1"


class MissingOnnx(PipelineError):
    """onnx or onnxscript is not installed."""


def _onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise MissingOnnx("ONNX export needs the onnx packages: pip install 'tlearn[onnx]' (onnx onnxscript; "
                          "onnxruntime to run the model)") from None
    return onnx


def metadata_of(path: str | os.PathLike) -> dict[str, str] | None:
    """The metadata_props of an ONNX file (its weights not read), or None when it is not one."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not protobuf, not ONNX, onnx absent: not a file this tool wrote
        return None
    return {p.key: p.value for p in model.metadata_props}


def is_exported_onnx(path: Path) -> bool:
    """An ONNX model `export` wrote (its metadata carries MARK), or a torch.export program that an older
    tlearn wrote under the .onnx name (which no ONNX runtime reads): both are this tool's to replace."""
    from .runfolder import is_exported_program

    meta = metadata_of(path)
    return (meta is not None and MARK in meta) or is_exported_program(path)


def export_onnx(run_dir: str, out: str | os.PathLike) -> dict:
    """Write the run's ProbabilityProgram to out as ONNX (atomically; never over a user's file).
    Returns {path, class_names, preprocess, novelty_threshold, opset}."""
    from .fsio import atomic_output
    from .predict import program_of
    from .runfolder import check_output_file

    check_output_file(out, is_exported_onnx, "an ONNX model exported by this tool")
    onnx = _onnx()
    run, module, example = program_of(run_dir)
    outputs = ["probabilities"] + (["novelty"] if module.with_novelty else [])
    try:
        program = torch.onnx.export(module, (example,), None, input_names=["images"], output_names=outputs,
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                                    opset_version=OPSET, dynamo=True, external_data=False, verbose=False)
        proto = program.model_proto
    except Exception as e:
        raise PipelineError(f"ONNX export failed for {run_dir}: {type(e).__name__}: "
                            f"{(str(e).strip().splitlines() or [''])[0][:200]}") from None
    threshold = run.novelty_threshold if module.with_novelty else None
    for key, value in _metadata(run, outputs, threshold).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    out = Path(out)
    try:  # a temp file renamed over the target: a full disk or a kill never leaves a truncated model there
        with atomic_output(out, suffix=".onnx") as tmp:
            onnx.save_model(proto, str(tmp))
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot write {out}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    return {"path": str(out), "class_names": run.class_names, "preprocess": run.preprocess,
            "novelty_threshold": threshold, "opset": OPSET}


def _metadata(run, outputs: list[str], threshold: float | None) -> dict[str, str]:
    meta = {MARK: FORMAT_VERSION, "class_names": json.dumps(run.class_names),
            "preprocess": json.dumps(run.preprocess.to_json()), "outputs": json.dumps(outputs),
            "input": "images: float32 N x 3 x crop x crop in [0, 1], after the run's Resize and CenterCrop"}
    if threshold is not None:
        meta["novelty_threshold"] = json.dumps(threshold)
        meta["novelty"] = "higher = less like the training photos; above novelty_threshold: unknown"
    return meta
