"""``Predictor``: class names, preprocessing and a backend (a PyTorch module, TorchScript or ONNX Runtime), run in
batches read by loader workers; evaluation and prediction both go through :meth:`Predictor.probabilities`."""
from __future__ import annotations

import json
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from .data import default_workers
from .images import IMAGE_EXTENSIONS, ImageError
from .preprocess import Preprocess

__all__ = ["FORMATS", "Predictor", "TorchBackend", "OnnxBackend", "expand_paths"]

#: export format -> the model file in an export folder
FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}


class TorchBackend:
    """A torch module (a trained model, or a TorchScript file) in eval mode on one device; logits come back on CPU."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device, non_blocking=True)).float().cpu()


class OnnxBackend:
    """An ONNX Runtime session (CUDA when onnxruntime has it and ``device`` is not 'cpu'): input 'input', logits out."""

    def __init__(self, path: str | Path, device: str | torch.device | None = None):
        import onnxruntime as ort
        gpu = str(device) != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ["CUDAExecutionProvider"] * gpu + ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.device = torch.device("cpu")  # onnxruntime takes and returns host arrays

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"input": x.detach().cpu().float().contiguous().numpy()})[0])


class Predictor:
    """Classes, preprocessing and a backend (any ``logits = backend(batch)``); with ``thresholds`` (one a label)
    multi-label: sigmoid probabilities, a label present when its probability reaches its threshold."""

    def __init__(self, classes: Sequence[str], preprocess: Preprocess,
                 backend: Callable[[torch.Tensor], torch.Tensor], thresholds: Sequence[float] | None = None):
        self.classes, self.preprocess, self.backend = list(classes), preprocess, backend
        self.thresholds = None if thresholds is None else [float(t) for t in thresholds]
        self.transform = preprocess.eval_transform()
        self.model = getattr(backend, "model", None)  # the torch module of a PyTorch or TorchScript backend

    @classmethod
    def load(cls, path: str | Path, checkpoint: str = "final", device: str | None = None) -> Predictor:
        """From a run folder (its best or last checkpoint), a checkpoint file, or an exported model folder."""
        path = Path(path)
        if (path / "export.json").is_file():
            return cls.from_export(path, device)
        from .run import Run, load_checkpoint
        return cls.from_checkpoint(load_checkpoint(Run.open(path).checkpoint(checkpoint) if path.is_dir() else path),
                                   device)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, device: str | None = None) -> Predictor:
        """From a checkpoint already in memory (``run.load_checkpoint``): its recipe's backbone and its weights."""
        from .augment import model_channels
        from .backbone import create_backbone
        from .run import recipe_from_checkpoint
        meta, recipe = ckpt["finetune"], recipe_from_checkpoint(ckpt)
        model = create_backbone(recipe.backbone.name, len(meta["classes"]), pretrained=False,
                                in_chans=model_channels(recipe))
        model.load_state_dict({k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
        return cls(meta["classes"], Preprocess.from_dict(meta["preprocess"]), TorchBackend(model, device),
                   meta.get("thresholds"))

    @classmethod
    def from_export(cls, folder: str | Path, device: str | None = None, meta: dict | None = None) -> Predictor:
        """From a ``finetune export`` folder (``meta``: its export.json if read): no timm, Lightning or training."""
        meta = meta or json.loads((Path(folder) / "export.json").read_text())
        path = Path(folder) / meta["file"]
        if meta["format"] == "onnx":
            backend = OnnxBackend(path, device)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load announces its deprecation
                backend = TorchBackend(torch.jit.load(str(path), map_location="cpu"), device)
        return cls(meta["classes"], Preprocess.from_dict(meta["preprocess"]), backend, meta.get("thresholds"))

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The network's raw output for a batch of preprocessed images (N, C, H, W), on the CPU."""
        return self.backend(x)

    def predict(self, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """Class probabilities of a batch of preprocessed images (N, C, H, W); ``tta`` adds the flipped batch."""
        act = torch.sigmoid if self.thresholds is not None else (lambda z: z.softmax(-1))
        p = act(self.logits(x))
        return (p + act(self.logits(x.flip(-1)))) / 2 if tta else p

    def probabilities(self, files: Sequence[str | Path], tta: bool = False, batch_size: int = 64,
                      workers: int | None = None) -> tuple[torch.Tensor, dict[int, str]]:
        """Class probabilities (N, classes) of image files in their order (read by ``workers`` loader processes),
        and ``{index: reason}`` of the files that could not be read (rows of NaN)."""
        names = np.array([str(f) for f in files])  # numpy, not a list of str: workers share the pages
        loader = DataLoader(range(len(files)), batch_size=batch_size,
                            collate_fn=partial(_load_batch, names, self.preprocess, self.transform),
                            num_workers=default_workers() if workers is None else workers,
                            pin_memory=getattr(self.backend, "device", torch.device("cpu")).type == "cuda")
        probs, errors = torch.full((len(files), len(self.classes)), float("nan")), {}
        for x, index, bad in loader:
            if len(index):
                probs[index] = self.predict(x, tta)
            errors.update(bad)
        return probs, errors

    def predict_paths(self, paths: Iterable[str | Path], top_k: int = 1, tta: bool = False, batch_size: int = 32,
                      workers: int | None = None) -> pd.DataFrame:
        """Top-k labels and probabilities for image files and folders (searched recursively): columns path, label_1,
        prob_1, ... (multi-label: labels, ';'-separated, prob_<label>) and ``error`` (why a file is unreadable)."""
        files = expand_paths(paths)
        probs, errors = self.probabilities(files, tta, batch_size, workers)
        table = pd.DataFrame({"path": [str(f) for f in files]})
        if self.thresholds is not None:
            present = (probs >= torch.tensor(self.thresholds)).numpy()
            table["labels"] = [";".join(c for c, on in zip(self.classes, row) if on) for row in present]
            table[[f"prob_{c}" for c in self.classes]] = probs.double().numpy().round(6)
        else:
            k = max(1, min(top_k, len(self.classes)))
            ok, top = ~probs.isnan().any(-1).numpy(), probs.nan_to_num(-1.0).topk(k, dim=-1)
            labels = np.array(self.classes, dtype=object)[top.indices.numpy()]
            for j in range(k):
                table[f"label_{j + 1}"] = np.where(ok, labels[:, j], "")
                table[f"prob_{j + 1}"] = np.where(ok, top.values[:, j].double().numpy().round(6), np.nan)
        if errors or self.thresholds is not None:
            table["error"] = [errors.get(i, "") for i in range(len(files))]
        return table


def _load_batch(files: np.ndarray, preprocess: Preprocess, transform: Callable,
                index: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict[int, str]]:
    """Files ``index`` preprocessed in a loader worker: the batch, the indices read, ``{index: reason}`` of the rest."""
    images, read, errors = [], [], {}
    for i in index:
        try:
            images.append(preprocess.load(str(files[i]), transform))
            read.append(i)
        except ImageError as e:
            errors[i] = e.reason
    return (torch.stack(images) if images else torch.empty(0)), torch.tensor(read, dtype=torch.long), errors


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders expanded to the images inside them (sorted, hidden files skipped)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                          and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist; give image files or folders")
    if not out:
        raise ValueError("no images found in the given paths")
    return out
