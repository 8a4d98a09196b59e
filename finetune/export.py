"""``export``: a run's model as ONNX or TorchScript, with its class names and preprocessing beside it in
``export.json`` (format, file, classes, preprocess, input size); :class:`ExportedPredictor` predicts from such a
folder with onnxruntime or torch.jit, finetune.preprocess/images/augment (with the recipe schema augment reads)
and albumentations only: no timm, no Lightning, none of the training code.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from .predict import Predictor
from .preprocess import Pipeline, Preprocess

__all__ = ["FORMATS", "export", "ExportedPredictor"]

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
OPSET = 17
#: largest difference between the export's logits and PyTorch's that ``export`` accepts
ATOL = 1e-4


def export(run: Any, fmt: str = "onnx", out: str | Path | None = None, *, checkpoint: str = "best") -> Path:
    """Export a run's checkpoint to ``out`` (default ``RUN/export-<fmt>``, numbered if it exists; a given ``out``
    that exists is an error) and check that the export's logits match PyTorch's on the run's own images."""
    from .run import Run, next_free

    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    run = run if isinstance(run, Run) else Run.open(run)
    ckpt = run.checkpoint(checkpoint)
    predictor = Predictor.load(ckpt, device="cpu")
    model = predictor.model
    model.eval()
    example = _example(run, predictor)
    if out is None:
        folder = next_free(run.path, f"export-{fmt}")
    else:
        folder = Path(out)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir()
        except FileExistsError:
            raise FileExistsError(f"{folder} exists and is never overwritten; choose another --out") from None
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
                "torch": torch.__version__}
        exported = ExportedPredictor(folder, meta, device="cpu")
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


def _example(run, predictor: Predictor, n: int = 4) -> torch.Tensor:
    """A few of the run's own images as the network sees them (real input for tracing and the parity check)."""
    items = run.items
    items = items[items["split"] == "val"] if (items["split"] == "val").any() else items
    paths = items["path"].head(n).tolist()
    return torch.stack([predictor.preprocess.load(p, predictor._transform) for p in paths])


class ExportedPredictor(Predictor):
    """An exported model with its classes and preprocessing: ``predict(x)`` and ``predict_paths(...)`` as
    :class:`~finetune.predict.Predictor`, run by onnxruntime (ONNX) or torch.jit (TorchScript)."""

    def __init__(self, folder: str | Path, meta: dict, device: str | torch.device | None = None):
        self.folder, self.meta = Path(folder), meta
        self.classes = list(meta["classes"])
        self.preprocess = Preprocess.from_dict(meta["preprocess"])
        self._transform = _eval_pipeline(self.preprocess)
        path = self.folder / meta["file"]
        if meta["format"] == "onnx":
            import onnxruntime as ort
            use_gpu = device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers()
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_gpu else ["CPUExecutionProvider"]
            self.session = ort.InferenceSession(str(path), providers=providers)
            self.device = torch.device("cpu")  # onnxruntime takes and returns host arrays
        elif meta["format"] == "torchscript":
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load announces its deprecation
                self.module = torch.jit.load(str(path), map_location=self.device).eval()
        else:
            raise ValueError(f"{self.folder}/export.json: unknown format {meta['format']!r}")

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None) -> ExportedPredictor:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "export.json").read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{folder} has no export.json: pass a folder made by 'finetune export'") from None
        return cls(folder, meta, device)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The exported network's raw output for a batch of preprocessed images (N, C, H, W)."""
        if self.meta["format"] == "onnx":
            out = self.session.run(None, {"input": x.detach().cpu().float().contiguous().numpy()})[0]
            return torch.from_numpy(out)
        return self.module(x.to(self.device)).cpu()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """Class probabilities for a batch of preprocessed images (N, C, H, W)."""
        p = self.logits(x).softmax(-1)
        if tta:
            p = (p + self.logits(x.flip(-1)).softmax(-1)) / 2
        return p


def _eval_pipeline(pre: Preprocess) -> Pipeline:
    """The serialised evaluation pipeline, rebuilt by finetune.augment (albumentations' from_dict; no timm)."""
    return pre.eval_transform()
