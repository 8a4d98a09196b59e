"""Optional packages: imported where a feature needs them, with one line naming the extra that installs them."""
from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``module`` imported, or an ImportError saying ``pip install 'finetune[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{feature} needs the optional package '{module}': pip install 'finetune[{extra}]'") from None
