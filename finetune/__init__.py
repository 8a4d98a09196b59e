"""finetune: fine-tune pretrained ImageNet backbones (timm) on your own images, with a freeze policy that
decides what to fix from the dataset's size and its distance to ImageNet."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {"fit": "train", "Predictor": "predict", "create_backbone": "backbone", "load_recipe": "recipe",
         "Recipe": "recipe", "Run": "run", "auto": "freeze", "Plan": "freeze", "stages": "stages", "scan": "data"}
__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name: str):
    """Import submodules on first use: ``import finetune`` stays fast and ``finetune --help`` instant."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
