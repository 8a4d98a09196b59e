"""Where the model looked: class-activation maps from the ``grad-cam`` package over the image as the network read
it (after the run's intensity scaling, resizing and cropping), for timm CNNs and ViT-style token models alike."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .extras import require

#: --method name -> grad-cam class
METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "xgradcam": "XGradCAM",
           "layercam": "LayerCAM", "eigencam": "EigenCAM", "eigengradcam": "EigenGradCAM", "scorecam": "ScoreCAM",
           "ablationcam": "AblationCAM"}


class Explainer:
    """A CAM on the layer that gives timm's ``forward_features`` of a predictor's model; called on a batch of
    preprocessed images, one map (H, W, 0..1) each for the class asked (default: the top one)."""

    def __init__(self, predictor, method: str = "gradcam"):
        cams = require("pytorch_grad_cam", "explain", "class-activation maps (finetune explain)")
        if method not in METHODS:
            raise ValueError(f"--method {method!r} is not known; choose one of {', '.join(METHODS)}")
        model = getattr(predictor, "model", None)
        if not isinstance(model, torch.nn.Module) or not getattr(model, "feature_info", None):
            raise ValueError("class-activation maps need the run's PyTorch model (a timm network): pass the run "
                             "folder, not an exported model")
        self.predictor, self.method = predictor, method
        layer = features_layer(model, predictor.preprocess.config["input_size"])
        self.cam = getattr(cams, METHODS[method])(model=model, target_layers=[layer], reshape_transform=_spatial(model))

    def __call__(self, x: torch.Tensor, targets: Sequence[int] | None = None) -> np.ndarray:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        x = x.to(self.predictor.backend.device)
        if targets is None:
            targets = self.predictor.predict(x).argmax(-1).tolist()
        with torch.enable_grad():
            return self.cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])

    def overlays(self, files: Sequence[str | Path], targets: Sequence[int] | None = None) -> list[tuple]:
        """For each file: the image as the model read it (normalisation undone; gray stays gray, several channels
        show the first) and the map over it, both H, W, 3 floats in [0, 1]."""
        from pytorch_grad_cam.utils.image import show_cam_on_image
        pre = self.predictor.preprocess
        x = torch.stack([pre.load(f, self.predictor.transform) for f in files])
        mean, std = (torch.tensor(pre.config[k], dtype=x.dtype).view(-1, 1, 1) for k in ("mean", "std"))
        views = (x * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        views = views if views.shape[-1] == 3 else np.repeat(views[..., :1], 3, axis=-1)
        return [(v, show_cam_on_image(v, m, use_rgb=True, image_weight=0.5) / 255.0)
                for v, m in zip(views, self(x, targets))]


def features_layer(model: torch.nn.Module, input_size: Sequence[int]) -> torch.nn.Module:
    """The module whose output ``forward_features`` returns, after the final norm and activation (the bare last
    stage's linear bottleneck maps measured worse: 0.52 of the map on the cat in tests/test_explain.py, not 0.68)."""
    done: list[tuple[torch.nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: done.append((m, o))) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            p = next(model.parameters())
            out = model.forward_features(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    return next(m for m, o in reversed(done) if o is out)


def _spatial(model: torch.nn.Module):
    """grad-cam's reshape_transform: token outputs (B, N, C) without their class/register tokens laid out on the
    patch grid, channels-last maps (Swin, ...) turned channels-first; CNN maps pass as they are."""
    channels = model.feature_info[-1]["num_chs"]
    prefix = getattr(model, "num_prefix_tokens", 0)

    def reshape(t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 3:
            t = t[:, prefix:]
            grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
            rows = grid[0] if grid and grid[0] * grid[1] == t.shape[1] else int(round(t.shape[1] ** 0.5))
            t = t.reshape(t.shape[0], rows, -1, t.shape[-1])
        if t.shape[-1] == channels and t.shape[1] != channels:
            t = t.permute(0, 3, 1, 2)
        return t

    return reshape


def explain(run: str | Path, paths: Sequence[str | Path], *, method: str = "gradcam", top_k: int = 3,
            out: str | Path | None = None, batch_size: int = 16) -> pd.DataFrame:
    """Top-k answers for images (files or folders) with one PNG each: the image as the model read it beside the
    map of its top answer, in ``out`` (default a new ``RUN/explain-<method>`` folder) with ``explain.csv``."""
    from PIL import Image

    from .predict import Predictor, expand_paths
    from .run import new_folder
    predictor = Predictor.load(run)
    explainer = Explainer(predictor, method)
    files = expand_paths(paths)
    table = predictor.predict_paths(files, top_k=top_k, batch_size=batch_size)
    folder = new_folder(Path(run), f"explain-{method.replace('+', 'p')}", out)
    targets = [predictor.classes.index(c) for c in table["label_1"]]
    names = [str(folder / f"{i:04d}-{Path(f).stem}.png") for i, f in enumerate(files)]
    for i in range(0, len(files), batch_size):
        pairs = explainer.overlays(files[i:i + batch_size], targets[i:i + batch_size])
        for name, (view, overlay) in zip(names[i:i + batch_size], pairs):
            Image.fromarray((np.concatenate([view, overlay], axis=1) * 255).round().astype(np.uint8)).save(name)
    table["overlay"] = names
    table.to_csv(folder / "explain.csv", index=False)
    return table
