"""``Predictor``: a trained run (or an export) applied to new images, batched, on the GPU when there is one."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import torch

from .images import IMAGE_EXTENSIONS
from .preprocess import Preprocess


class Predictor:
    """A model with its class names and preprocessing; ``predict_paths`` gives a table of top-k labels."""

    def __init__(self, model: torch.nn.Module, classes: Sequence[str], preprocess: Preprocess,
                 device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.classes, self.preprocess = list(classes), preprocess
        self._transform = preprocess.eval_transform()

    @classmethod
    def load(cls, path: str | Path, checkpoint: str = "best", device: str | None = None) -> "Predictor":
        """From a run folder (its best or last checkpoint), a checkpoint file, or an exported model folder."""
        path = Path(path)
        if (path / "export.json").is_file():
            from .export import ExportedPredictor
            return ExportedPredictor.load(path, device)
        from .run import Run, load_checkpoint
        ckpt_path = Run.open(path).checkpoint(checkpoint) if path.is_dir() else path
        return cls.from_checkpoint(load_checkpoint(ckpt_path), device)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, device: str | None = None) -> "Predictor":
        from . import augment
        from .backbone import create_backbone
        from .run import recipe_from_checkpoint
        meta = ckpt["finetune"]
        recipe = recipe_from_checkpoint(ckpt)
        model = create_backbone(recipe.backbone.name, len(meta["classes"]), pretrained=False,
                                in_chans=augment.model_channels(recipe))
        state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        model.load_state_dict(state)
        return cls(model, meta["classes"], Preprocess.from_dict(meta["preprocess"]), device)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """Class probabilities for a batch of preprocessed images (N, C, H, W)."""
        x = x.to(self.device)
        p = self.model(x).softmax(-1)
        if tta:
            p = (p + self.model(x.flip(-1)).softmax(-1)) / 2
        return p.cpu()

    def predict_paths(self, paths: Iterable[str | Path], top_k: int = 1, tta: bool = False,
                      batch_size: int = 32) -> pd.DataFrame:
        """Top-k labels and probabilities for image files and folders (searched recursively)."""
        files = expand_paths(paths)
        k = max(1, min(top_k, len(self.classes)))
        top = self.probabilities(files, tta, batch_size).topk(k, dim=-1)
        rows = []
        for f, vals, idx in zip(files, top.values, top.indices):
            row = {"path": str(f)}
            for j in range(k):
                row[f"label_{j + 1}"] = self.classes[int(idx[j])]
                row[f"prob_{j + 1}"] = round(float(vals[j]), 6)
            rows.append(row)
        return pd.DataFrame(rows)

    def probabilities(self, files: Sequence[str | Path], tta: bool = False, batch_size: int = 32) -> torch.Tensor:
        """Class probabilities (N, classes) of image files, in their order, read and predicted in batches."""
        out = [self.predict(torch.stack([self.preprocess.load(f, self._transform) for f in files[i:i + batch_size]]),
                            tta) for i in range(0, len(files), batch_size)]
        return torch.cat(out) if out else torch.empty(0, len(self.classes))


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
