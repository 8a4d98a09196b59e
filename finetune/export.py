"""``export``: a run's model as ONNX or TorchScript, with classes and preprocessing (also as plain numbers) in
``export.json``; ``Predictor.load(folder)`` predicts from it with onnxruntime or torch.jit."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from .predict import FORMATS, Predictor
from .preprocess import Preprocess

__all__ = ["FORMATS", "export", "input_spec"]

OPSET = 17
#: largest difference between the export's logits and PyTorch's that ``export`` accepts
ATOL = 1e-4
#: OpenCV's interpolation flags by value, as albumentations stores them
_CV2 = {0: "INTER_NEAREST", 1: "INTER_LINEAR", 2: "INTER_CUBIC", 3: "INTER_AREA", 4: "INTER_LANCZOS4"}


def export(run: Any, fmt: str = "onnx", out: str | Path | None = None, *, checkpoint: str = "final") -> Path:
    """Export a run's checkpoint to ``out`` (default ``RUN/export-<fmt>``, numbered if it exists; a given ``out``
    that exists is an error) and check that the export's logits match PyTorch's on the run's own images."""
    from .run import Run, new_folder

    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    run = run if isinstance(run, Run) else Run.open(run)
    ckpt = run.checkpoint(checkpoint)
    predictor = Predictor.load(ckpt, device="cpu")
    model = predictor.model  # in eval mode, without the hold of training
    items = run.items  # a few of the run's own images: real input for tracing and the parity check
    items = items[items["split"] == "val"] if (items["split"] == "val").any() else items
    example = torch.stack([predictor.preprocess.load(p, predictor.transform) for p in items["path"].head(4)])
    folder = new_folder(run.path, f"export-{fmt}", out)
    try:
        path = folder / FORMATS[fmt]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # both exporters announce their deprecation on every call
            if fmt == "onnx":
                torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                                  opset_version=OPSET, dynamo=False)
            else:
                torch.jit.trace(model, example).save(str(path))
        meta = {"format": fmt, "file": path.name, "output": "logits", "classes": predictor.classes,
                "preprocess": predictor.preprocess.to_dict(), "input_size": list(example.shape[1:]),
                "batch": "dynamic", "run": str(run.path), "checkpoint": str(ckpt.relative_to(run.path)),
                "backbone": run.recipe.backbone.name, "opset": OPSET if fmt == "onnx" else None,
                "torch": torch.__version__, "input": input_spec(predictor.preprocess)}
        if predictor.thresholds is not None:  # multi-label: sigmoid of each logit, present at or above its threshold
            meta.update(output="logits (multi-label: sigmoid)", thresholds=predictor.thresholds)
        exported = Predictor.from_export(folder, "cpu", meta)
        with torch.no_grad():
            diff = float((exported.logits(example) - model(example)).abs().max())
        if not diff <= ATOL:
            raise RuntimeError(f"the {fmt} export's logits differ from PyTorch's by {diff:.2e} > {ATOL:g}")
        meta["max_abs_diff"] = diff
        (folder / "export.json").write_text(json.dumps(meta, indent=2))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def input_spec(pre: Preprocess) -> dict:
    """The evaluation preprocessing as plain numbers, for code without torch or albumentations (the numpy snippet
    in docs/results.md): reading, intensity scaling, resize (shorter side, or both sides), centre crop, normalise."""
    spec: dict[str, Any] = {"channels": pre.channels, "intensity": pre.intensity, "percentiles": list(pre.percentiles),
                            "stats": None if pre.stats is None else [list(s) for s in pre.stats],
                            "resize_shorter_side": None, "resize": None, "center_crop": None}
    for t in pre.pipeline["transform"]["transforms"]:
        name = t["__class_fullname__"].rsplit(".", 1)[-1]
        if name == "SmallestMaxSize":
            spec["resize_shorter_side"] = t["max_size"]
        elif name == "Resize":
            spec["resize"] = [t["height"], t["width"]]
        elif name == "CenterCrop":
            spec["center_crop"] = [t["height"], t["width"]]
        elif name == "Normalize" and t["max_pixel_value"] == 1 and t.get("normalization", "standard") == "standard":
            spec["mean"], spec["std"] = list(t["mean"]), list(t["std"])
        elif name != "ToTensorV2":
            raise ValueError(f"the evaluation pipeline has a step {name} that export.json's 'input' cannot describe")
        if "interpolation" in t:
            spec["interpolation"] = _CV2[t["interpolation"]]
            spec["area_when_shrinking"] = t.get("area_for_downscale") is not None
    spec["layout"] = "float32 N x C x H x W, input 'input', output 'logits'"
    return spec
