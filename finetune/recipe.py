"""The recipe: a validated tree of dataclasses carrying every setting from YAML (``extends:``, ``key=value``
overrides) to the run folder; every key and value is checked once, here, so the rest of the code never re-validates."""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"


class RecipeError(ValueError):
    """A recipe file, key or value is wrong; the message names it and says what to do."""


@dataclass
class Backbone:
    """Which pretrained network to start from."""

    name: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    weights: Union[str, None] = None  # a local weights file; None: timm hub, then packaged weights
    drop_rate: float = 0.2


@dataclass
class Image:
    """How files become float tensors: channels, intensity scaling, input size and normalisation."""

    channels: int = 3  # channels read from each file: 1 gray, 3 RGB, N multi-channel TIFF
    stem: Literal["replicate", "adapt"] = "replicate"  # channels != 3: copy to 3, or adapt the first conv
    intensity: Literal["range", "percentile", "dataset"] = "range"
    percentiles: tuple[float, float] = (1.0, 99.8)
    size: Union[int, None] = None  # None: the backbone's data config
    crop_pct: Union[float, None] = None  # None: the backbone's data config
    interpolation: Union[str, None] = None  # None: the backbone's data config
    mean: Union[tuple[float, ...], None] = None  # None: the backbone's (ImageNet) statistics
    std: Union[tuple[float, ...], None] = None
    max_pixels: int = 89_478_485  # decompression-bomb guard


@dataclass
class Augment:
    """The albumentations pipeline: a crop, then a list of transforms (by class name), then normalisation."""

    crop: Literal["random_resized", "resize"] = "random_resized"
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)
    eval_crop: Literal["center", "resize"] = "center"
    transforms: list[dict] = field(default_factory=lambda: [
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "ColorJitter", "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02, "p": 0.5},
    ])


@dataclass
class Freeze:
    """The freeze-policy prior: what the images are, and how much of the decision to leave to ``auto``."""

    domain: Union[str, float] = "natural"  # natural | histology | microscopy | fluorescence | measure | 0..1
    mode: Literal["auto", "full", "probe", "fixed"] = "auto"
    depth: Union[int, None] = None  # mode fixed: how many leading groups stay fixed
    bn: Literal["auto", "train", "frozen", "adapt", "affine"] = "auto"
    schedule: Literal["auto", "none", "lp-ft", "gradual"] = "auto"
    probe_epochs: Union[int, None] = None  # lp-ft: epochs of linear probe before unfreezing; None: auto
    lr_decay: Union[float, None] = None  # multiplier per group going back from the head; None: auto


@dataclass
class Optim:
    """Optimiser and schedule; ``lr`` is the head's rate, the backbone's a fraction (``find``: Lightning's finder)."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: Union[float, Literal["find"]] = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.01


@dataclass
class Loss:
    """Loss settings: label smoothing and class balancing for skewed data."""

    label_smoothing: float = 0.1
    balance: Literal["none", "sampler", "weights"] = "none"


@dataclass
class Train:
    """The loop: epochs, batches, hardware, splits, data checks, speed switches."""

    epochs: int = 5
    batch_size: int = 32
    precision: Literal["32-true", "16-mixed", "bf16-mixed"] = "32-true"
    accelerator: str = "auto"
    devices: Union[int, str] = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    seed: int = 0
    deterministic: bool = False
    val_fraction: float = 0.2
    labels: Literal["auto", "single", "multi"] = "auto"  # multi: several labels an image; auto: the CSV's form
    split_groups: Union[str, None] = None  # regex on the file name; its match keeps a group on one side
    num_workers: Union[int, str] = "auto"
    channels_last: bool = False
    compile: bool = False
    cache_features: Union[bool, str] = "auto"
    # a second fit on train + val after the one that chose the epoch; auto: single-label, under REFIT_BELOW a class
    refit: Union[bool, str] = "auto"
    max_bad_fraction: float = 0.2
    scan: Literal["auto", "full", "header"] = "auto"  # auto: headers only from data.HEADER_ONLY_FROM files on
    strict: bool = False
    allow_outside: bool = False
    # besides the CSV log (always written): tensorboard, mlflow (MLFLOW_TRACKING_URI, else RUN/mlruns), wandb
    loggers: list[Literal["csv", "tensorboard", "mlflow", "wandb"]] = field(default_factory=lambda: ["csv"])


@dataclass
class Recipe:
    """Every setting of a run, validated."""

    name: str = "custom"
    description: str = ""
    backbone: Backbone = field(default_factory=Backbone)
    image: Image = field(default_factory=Image)
    augment: Augment = field(default_factory=Augment)
    freeze: Freeze = field(default_factory=Freeze)
    optim: Optim = field(default_factory=Optim)
    loss: Loss = field(default_factory=Loss)
    train: Train = field(default_factory=Train)

    def to_dict(self) -> dict:
        """Plain dict (tuples as lists) that ``from_dict`` and YAML round-trip."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write the resolved recipe; refuses to overwrite an existing file."""
        with open(path, "x") as f:
            f.write(self.to_yaml())

    def override(self, overrides: dict[str, Any] | list[str] | None, source: str = "override") -> Recipe:
        """A new recipe with ``{'optim.lr': 3e-4}`` or ``['optim.lr=3e-4']`` applied and validated."""
        data = self.to_dict()
        for key, value in _parse_overrides(overrides):
            node, (*parents, last) = data, key.split(".")
            for p in parents:
                if not isinstance(node.get(p), dict):
                    _unknown(p, [k for k, v in node.items() if isinstance(v, dict)], "", "override")
                node = node[p]
            if last not in node:
                _unknown(last, list(node), ".".join(parents), "override")
            node[last] = value
        return from_dict(data, source)


_RANGES: dict[str, tuple[float, float]] = {
    "image.channels": (1, 64), "image.size": (8, 4096), "image.crop_pct": (0.1, 1.0),
    "image.max_pixels": (1, 1e12), "backbone.drop_rate": (0, 0.99),
    "freeze.depth": (0, 1000), "freeze.probe_epochs": (0, 10_000), "freeze.lr_decay": (0.0, 1.0),
    "optim.lr": (1e-8, 10), "optim.weight_decay": (0, 10), "optim.momentum": (0, 1),
    "optim.warmup_epochs": (0, 10_000), "optim.min_lr_ratio": (0, 1), "loss.label_smoothing": (0, 0.99),
    "train.epochs": (1, 100_000), "train.batch_size": (1, 1 << 16), "train.num_nodes": (1, 10_000),
    "train.val_fraction": (0, 0.9), "train.max_bad_fraction": (0, 1),
}
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_KINDS = {type(None): "null", int: "an integer", float: "a number", str: "text", bool: "true or false",
          dict: "a mapping", list: "a list", tuple: "a list"}
DOMAIN_WORDS = ("natural", "histology", "microscopy", "fluorescence", "measure")


def from_dict(data: dict, source: str = "<dict>") -> Recipe:
    """Validate a nested dict against the schema; ``source`` names the file in errors."""
    recipe = _build(Recipe, {k: v for k, v in data.items() if k != "extends"}, "", source)
    _check_consistency(recipe, source)
    return recipe


def load_recipe(name_or_path: str | Path | None = None, overrides: dict | list | None = None) -> Recipe:
    """A shipped recipe by name (default ``natural``) or a YAML path, ``extends`` resolved, overrides applied."""
    path = resolve_path(name_or_path or "natural")
    recipe = from_dict(_load_tree(path, ()), str(path))
    return recipe.override(overrides) if overrides else recipe


def list_recipes() -> dict[str, str]:
    """Shipped recipe names and their one-line descriptions."""
    return {path.stem: (str(_read_yaml(path).get("description") or "").strip().splitlines() or [""])[0]
            for path in sorted(RECIPE_DIR.glob("*.yaml"))}


def resolve_path(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """A recipe file: an existing path (absolute, or relative to ``relative_to``), else a shipped name."""
    for candidate in ([] if relative_to is None else [relative_to / name_or_path]) + [Path(name_or_path)]:
        if candidate.is_file():
            return candidate.resolve()
    shipped = RECIPE_DIR / f"{Path(str(name_or_path)).stem}.yaml"
    if shipped.is_file() and not str(name_or_path).endswith((".yaml", ".yml")):
        return shipped
    names = sorted(list_recipes())
    hint = difflib.get_close_matches(str(name_or_path), names, n=1)
    raise RecipeError(f"recipe '{name_or_path}' is neither a file nor a shipped recipe"
                      + (f"; did you mean '{hint[0]}'?" if hint else "")
                      + f" Shipped recipes: {', '.join(names)}; or pass the path to your own YAML file.")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise RecipeError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or str(e).splitlines()[0]}; "
                          f"recipes are plain YAML (no !!python tags)") from None
    if not isinstance(data, (dict, type(None))):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (backbone:, image:, ...), "
                          f"got {type(data).__name__}")
    return data or {}


def _load_tree(path: Path, seen: tuple[Path, ...]) -> dict:
    if path in seen:
        raise RecipeError(f"{path}: 'extends' loops back to itself through {' -> '.join(map(str, seen))}")
    data = _read_yaml(path)
    if data.get("extends") is None:
        return data
    return _merge(_load_tree(resolve_path(data["extends"], relative_to=path.parent), seen + (path,)), data)


def _merge(base: dict, top: dict) -> dict:
    """Deep-merge mappings; lists and scalars in ``top`` replace those in ``base``."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_overrides(overrides: dict | list | None) -> list[tuple[str, Any]]:
    if isinstance(overrides, dict):
        return list(overrides.items())
    pairs = []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override '{item}' is not key=value; write for example --set optim.lr=3e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise RecipeError(f"override '{item}': the value is not valid YAML ({first}); quote text values, "
                              f"write lists as [1, 2]") from None
        pairs.append((key.strip(), value))
    return pairs


def _unknown(key: str, valid: list[str], prefix: str, source: str) -> None:
    full = f"{prefix}.{key}" if prefix else key
    hint = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    close = f"; did you mean '{prefix + '.' if prefix else ''}{hint[0]}'?" if hint else ""
    raise RecipeError(f"{source}: unknown key '{full}'{close} Valid keys here: {', '.join(valid)}")


def _build(cls: type, data: Any, prefix: str, source: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: '{prefix}' must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)  # the dataclass's fields, in order
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            _unknown(str(key), list(hints), prefix, source)
        where, tp = f"{prefix}.{key}" if prefix else key, hints[key]
        kwargs[key] = _build(tp, value or {}, where, source) if dataclasses.is_dataclass(tp) else _coerce(
            value, tp, where, source)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, where: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form (tuples, floats)."""
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _coerce(value, option, where, source)
            except RecipeError as e:
                errors.append(e)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (int in args or float in args):
            raise errors[args.index(int if int in args else float)]  # the number's own error: its range
        raise errors[0] if len(args) == 2 and type(None) in args and value is not None else RecipeError(
            f"{source}: '{where}' = {value!r} must be one of: {' or '.join(map(_type_name, args))}")
    if tp is type(None):
        if value is None:
            return None
        raise RecipeError(f"{source}: '{where}' must be empty (null), got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        raise RecipeError(f"{source}: '{where}' = {value!r} is not allowed; choose one of {', '.join(map(str, args))}"
                          + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    if tp in (int, float):
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # PyYAML reads 3e-4 (no dot) as text
        if isinstance(value, bool) or not isinstance(value, (int, float)) or tp is int and float(value) != int(value):
            raise RecipeError(f"{source}: '{where}' must be {_KINDS[tp]}, got {value!r}")
        value = tp(value)
        lo, hi = _RANGES.get(where.split("[")[0], (-float("inf"), float("inf")))
        if not lo <= value <= hi:
            raise RecipeError(f"{source}: '{where}' = {value} is out of range; use a value in [{lo:g}, {hi:g}]")
        return value
    if origin not in _KINDS:  # int, float and None returned above
        raise TypeError(f"schema type {tp} of '{where}' is not supported")
    if not isinstance(value, (list, tuple) if origin is tuple else origin):
        raise RecipeError(f"{source}: '{where}' must be {_KINDS[origin]}, got {value!r}")
    if origin is tuple and args[-1] is not Ellipsis and len(value) != len(args):
        raise RecipeError(f"{source}: '{where}' must have {len(args)} items, got {list(value)!r}")
    if origin in (list, tuple):  # every list and tuple in the schema says what its items are
        item_types = args if origin is tuple and args[-1] is not Ellipsis else [args[0]] * len(value)
        return origin(_coerce(v, a, f"{where}[{i}]", source) for i, (v, a) in enumerate(zip(value, item_types)))
    return origin(value)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    return "true/false" if tp is bool else _KINDS.get(tp, str(tp))


def _check_consistency(r: Recipe, source: str) -> None:
    """Cross-field rules: each error names both sides."""
    d = r.freeze.domain
    if isinstance(d, str) and d not in DOMAIN_WORDS:
        hint = difflib.get_close_matches(d, DOMAIN_WORDS, n=1)
        raise RecipeError(f"{source}: 'freeze.domain' = {d!r} is not known; use one of {', '.join(DOMAIN_WORDS)} "
                          f"or a distance in [0, 1]" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    if isinstance(d, float) and not 0 <= d <= 1:
        raise RecipeError(f"{source}: 'freeze.domain' = {d} must be a distance in [0, 1]")
    if r.image.channels > 3 and r.image.stem == "replicate":
        raise RecipeError(f"{source}: 'image.channels' = {r.image.channels} cannot use 'image.stem' = replicate "
                          f"(that copies one channel to three); set image.stem: adapt")
    if r.image.channels == 2:
        raise RecipeError(f"{source}: 'image.channels' = 2 is not supported: use 1, 3 or 4 and more (adapted stem)")
    n = r.image.channels if r.image.stem == "adapt" else 3
    for key in ("mean", "std"):
        v = getattr(r.image, key)
        if v is not None and len(v) not in (1, n):
            raise RecipeError(f"{source}: 'image.{key}' has {len(v)} values but the model sees {n} channels (image."
                              f"channels={r.image.channels}, image.stem={r.image.stem}); give {n} values or null")
    if r.freeze.mode == "fixed" and r.freeze.depth is None:
        raise RecipeError(f"{source}: 'freeze.mode' = fixed needs 'freeze.depth' (how many leading groups stay fixed)")
    lo, hi = r.augment.crop_scale
    if not 0 < lo <= hi <= 1:
        raise RecipeError(f"{source}: 'augment.crop_scale' = [{lo}, {hi}] must satisfy 0 < low <= high <= 1")
    for key in ("refit", "cache_features", "num_workers"):
        value = getattr(r.train, key)
        if isinstance(value, str) and value != "auto":
            use = "auto or a number" if key == "num_workers" else "auto, true or false"
            raise RecipeError(f"{source}: 'train.{key}' = {value!r}: use {use}")
    for i, t in enumerate(r.augment.transforms):
        if "name" not in t:
            raise RecipeError(f"{source}: 'augment.transforms[{i}]' = {t!r} needs a 'name' (an albumentations class)")
