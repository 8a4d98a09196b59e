"""finetune: fine-tune pretrained ImageNet backbones (timm) on your own images, with a freeze policy that
decides what to fix from the dataset's size and its distance to ImageNet."""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "fit": ("train", "fit"),
    "Predictor": ("predict", "Predictor"),
    "create_backbone": ("backbone", "create_backbone"),
    "load_recipe": ("recipe", "load_recipe"),
    "Recipe": ("recipe", "Recipe"),
    "Run": ("run", "Run"),
    "auto": ("freeze", "auto"),
    "Plan": ("freeze", "Plan"),
    "stages": ("stages", "stages"),
    "scan": ("data", "scan"),
}
__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name: str):
    """Import submodules on first use: ``import finetune`` stays fast and ``finetune --help`` instant."""
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
