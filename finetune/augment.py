"""Augmentation pipelines from a recipe (the only module that imports albumentations): float32 HxWxC in [0, 1] to a
CHW tensor, saved with albumentations' ``to_dict`` so a model predicts with exactly what it was trained with."""
from __future__ import annotations

import difflib
import inspect
import json
import math
import os
from enum import Enum
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check (a network call) on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

from finetune.recipe import Recipe, RecipeError  # noqa: E402

__all__ = ["data_config", "model_channels", "read_channels", "build_transforms", "check_transforms",
           "save_pipeline", "load_pipeline", "pipeline_to_dict", "pipeline_from_dict", "INTERPOLATIONS"]

INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                  "area": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4}

_OWNED = {  # never listed in augment.transforms, and why
    "Normalize": "the pipeline ends by normalising with image.mean and image.std",
    "ToTensorV2": "the pipeline ends with it", "ToFloat": "images arrive as float32 in [0, 1] (image.intensity)",
    "FromFloat": "it would squeeze the float32 image into 8 bits and lose 16-bit precision",
    "Compose": "the pipeline is the Compose; group transforms with OneOf, SomeOf or Sequential",
}
_BASES = {"BasicTransform", "DualTransform", "ImageOnlyTransform", "Transform3D", "BaseCompose", "ReplayCompose",
          "MaxSizeTransform"}
_TRANSFORMS: dict[str, type] = {
    name: cls for name, cls in [*vars(A).items(), ("ToTensorV2", ToTensorV2)]
    if isinstance(cls, type) and issubclass(cls, (A.BasicTransform, A.BaseCompose))
    and not name.startswith(("_", "Base")) and name not in _BASES and cls.is_serializable()
    and not issubclass(cls, A.Transform3D)
}
_CHANNEL_AGNOSTIC = ("HorizontalFlip, VerticalFlip, D4, RandomRotate90, Affine, ElasticTransform, "
                     "RandomBrightnessContrast, RandomGamma, GaussianBlur, GaussNoise")


def model_channels(recipe: Recipe) -> int:
    """Channels the network's first layer takes: the file's channels with an adapted stem, else 3."""
    return recipe.image.channels if recipe.image.stem == "adapt" else 3


def read_channels(recipe: Recipe) -> int:
    """Channels the reader hands to the pipeline: 3 with ``stem: replicate`` (gray copied), else image.channels."""
    return 3 if recipe.image.stem == "replicate" else recipe.image.channels


def data_config(recipe: Recipe, model: torch.nn.Module) -> dict:
    """timm's data config for ``model`` (input_size, mean, std, crop_pct, interpolation), non-null image.* applied."""
    from timm.data import resolve_model_data_config

    timm_cfg = resolve_model_data_config(model)
    im, n = recipe.image, model_channels(recipe)
    h, w = (im.size, im.size) if im.size is not None else tuple(timm_cfg["input_size"][1:])
    stats = {}
    for key in ("mean", "std"):
        value = getattr(im, key)
        if value is None:
            # timm's adapt_input_conv sums or repeats the RGB filters: each channel gets the average R, G, B statistic
            value = tuple(timm_cfg[key]) if n == 3 else (sum(timm_cfg[key]) / len(timm_cfg[key]),)
        stats[key] = tuple(float(v) for v in (value * n if len(value) == 1 else value))
    return {"input_size": (n, int(h), int(w)), **stats,
            "crop_pct": float(im.crop_pct if im.crop_pct is not None else timm_cfg.get("crop_pct") or 0.875),
            "interpolation": im.interpolation or timm_cfg.get("interpolation") or "bicubic"}


def build_transforms(recipe: Recipe, config: dict, train: bool) -> A.Compose:
    """Train: crop, the recipe's transforms, normalise. Eval: resize (and centre crop), normalise. Out: CHW tensor."""
    source = f"recipe '{recipe.name}'"
    (_, h, w), aug = config["input_size"], recipe.augment
    # cv2 does not antialias when it shrinks (PIL, which timm uses, does): INTER_AREA for downscaling instead.
    resize = {"interpolation": _interpolation(config["interpolation"], source), "area_for_downscale": "image"}
    if train:
        steps = [A.RandomResizedCrop(size=(h, w), scale=aug.crop_scale, ratio=aug.crop_ratio, p=1.0, **resize)
                 if aug.crop == "random_resized" else A.Resize(h, w, p=1.0, **resize)]
        steps += [_make(spec, f"augment.transforms[{i}]", source) for i, spec in enumerate(aug.transforms)]
    elif aug.eval_crop == "center":
        # timm's eval transform: shorter side to size / crop_pct, then the central size x size.
        steps = [A.SmallestMaxSize(max_size=math.floor(max(h, w) / config["crop_pct"]), p=1.0, **resize),
                 A.CenterCrop(h, w, p=1.0)]
    else:
        steps = [A.Resize(h, w, p=1.0, **resize)]
    steps += [A.Normalize(mean=config["mean"], std=config["std"], max_pixel_value=1.0, p=1.0), ToTensorV2()]
    return A.Compose(steps)


def check_transforms(recipe: Recipe, source: str = "recipe") -> None:
    """Fail early, naming the entry, on unknown transforms, bad arguments, or transforms that cannot run here: each
    runs once on a float32 image of the recipe's size and channels (albumentations checks channels only then)."""
    aug, im = recipe.augment, recipe.image
    lo, hi = aug.crop_ratio
    if not 0 < lo <= hi:
        raise RecipeError(f"{source}: 'augment.crop_ratio' = [{lo}, {hi}] must satisfy 0 < low <= high")
    if im.interpolation is not None:
        _interpolation(im.interpolation, source)
    c, size = read_channels(recipe), im.size or 224
    image = np.random.default_rng(0).random((size, size, c), dtype=np.float32)
    for i, spec in enumerate(aug.transforms):
        _trial(_make(spec, f"augment.transforms[{i}]", source), f"augment.transforms[{i}]", image, recipe, source)


def pipeline_to_dict(compose: A.Compose) -> dict:
    """A pipeline as plain JSON data (``A.to_dict``), to store in run folders, checkpoints and exports."""
    return json.loads(json.dumps(A.to_dict(compose), default=_json_default))


def pipeline_from_dict(data: dict) -> A.Compose:
    """The pipeline ``pipeline_to_dict`` wrote (``A.from_dict``)."""
    return A.from_dict(data)


def save_pipeline(compose: A.Compose, path: str | Path) -> None:
    """Write a pipeline as albumentations JSON, to travel with a trained or exported model."""
    Path(path).write_text(json.dumps(pipeline_to_dict(compose), indent=1))


def load_pipeline(path: str | Path) -> A.Compose:
    """Read a pipeline written by ``save_pipeline``."""
    return pipeline_from_dict(json.loads(Path(path).read_text()))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} {obj!r} into a pipeline file")


def _interpolation(name: str, source: str) -> int:
    if name not in INTERPOLATIONS:
        hint = difflib.get_close_matches(name, list(INTERPOLATIONS), n=1)
        raise RecipeError(f"{source}: 'image.interpolation' = {name!r} is not known; use one of "
                          f"{', '.join(INTERPOLATIONS)}" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    return INTERPOLATIONS[name]


def _make(spec: dict, where: str, source: str) -> Any:
    """Build one ``{name: Class, arg: value}`` entry; a OneOf/SomeOf/Sequential lists children under 'transforms'."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise RecipeError(f"{source}: '{where}' = {spec!r} needs a 'name' (an albumentations class)")
    kwargs = dict(spec)
    name = kwargs.pop("name")
    if name in _OWNED:
        raise RecipeError(f"{source}: '{where}': {name} must not be listed: {_OWNED[name]}")
    cls = _TRANSFORMS.get(name)
    if cls is None:
        lower = {n.lower(): n for n in _TRANSFORMS if n not in _OWNED}
        hint = difflib.get_close_matches(str(name).lower(), list(lower), n=1, cutoff=0.6)
        raise RecipeError(f"{source}: '{where}.name' = {name!r} is not an albumentations transform"
                          + (f"; did you mean '{lower[hint[0]]}'?" if hint else "")
                          + f" (albumentations {A.__version__}: see https://explore.albumentations.ai)")
    params = [k for k, v in inspect.signature(cls.__init__).parameters.items()
              if k != "self" and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
    for key in kwargs:
        if key not in params:
            hint = difflib.get_close_matches(str(key), params, n=1, cutoff=0.5)
            raise RecipeError(f"{source}: '{where}' ({name}) has no argument '{key}'"
                              + (f"; did you mean '{hint[0]}'?" if hint else "") + f" Valid: {', '.join(params)}")
    if issubclass(cls, A.BaseCompose):
        children = kwargs.get("transforms")
        if not isinstance(children, list) or not children:
            raise RecipeError(f"{source}: '{where}' ({name}) needs 'transforms': a list of transforms to pick from")
        kwargs["transforms"] = [_make(c, f"{where}.transforms[{j}]", source) for j, c in enumerate(children)]
    try:
        try:
            return cls(**kwargs, strict=True)  # strict: a failed check raises instead of warning and using defaults
        except TypeError as e:
            if "'strict'" not in str(e):
                raise
            return cls(**kwargs)  # composes and transforms without a validation schema take no 'strict'
    except (TypeError, ValueError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "errors.pydantic.dev" not in ln]
        raise RecipeError(f"{source}: '{where}' ({name}) has bad arguments: "
                          + "; ".join(lines).replace("for InitSchema", f"for {name}")) from None


def _trial(t: Any, where: str, image: np.ndarray, recipe: Recipe, source: str) -> None:
    """Run each transform of ``t`` with p=1 on a float32 image; it must keep the shape and the float32 dtype."""
    if isinstance(t, A.BaseCompose):
        for j, child in enumerate(t.transforms):
            _trial(child, f"{where}.transforms[{j}]", image, recipe, source)
        return
    name, c = type(t).__name__, image.shape[-1]
    t.p = 1.0
    t.set_random_seed(0)
    try:
        out = t(image=image.copy())["image"]
    except Exception as e:  # noqa: BLE001  albumentations raises TypeError, ValueError or cv2.error here
        e = " ".join(str(e).split()).rstrip(".")
        if c not in (1, 3):
            raise RecipeError(
                f"{source}: '{where}' ({name}) does not work on {c}-channel images (image.channels="
                f"{recipe.image.channels}, image.stem={recipe.image.stem}): {e}. Colour transforms (ColorJitter, "
                f"HueSaturationValue, CLAHE, ToGray, ...) take only 1 or 3 channels; for N channels use "
                f"channel-agnostic ones: {_CHANNEL_AGNOSTIC}") from None
        raise RecipeError(f"{source}: '{where}' ({name}) fails on a float32 {image.shape[0]}x{image.shape[1]}x{c} "
                          f"image: {e}") from None
    if out.shape != image.shape:
        raise RecipeError(f"{source}: '{where}' ({name}) changes the image shape {image.shape} -> {out.shape}; "
                          f"crops and resizing come from augment.crop and augment.eval_crop")
    if out.dtype != np.float32:
        raise RecipeError(f"{source}: '{where}' ({name}) turns the float32 image into {out.dtype}; the pipeline "
                          f"works on float32 in [0, 1] so that 16-bit precision survives")
