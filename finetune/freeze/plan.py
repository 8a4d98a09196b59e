"""The plan: per stage of one model, when it starts training (or never), its lr multiplier and BatchNorm mode; from a
decision (:func:`auto`), by hand (:func:`fixed`, :func:`probe`, :func:`full`) or for a recipe (:func:`plan_for`)."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch

from ..stages import stages
from . import rule

if TYPE_CHECKING:
    from ..recipe import Recipe

log = logging.getLogger("finetune")
_BN = torch.nn.modules.batchnorm._BatchNorm


@dataclass
class GroupPlan:
    """One stage's part: when it starts training (None: never), its lr multiplier, its BN mode ('-': no BatchNorm)."""

    name: str
    kind: str
    params: tuple[str, ...]
    modules: tuple[str, ...]
    train_from: int | None
    lr_mult: float
    bn: str = "train"
    numel: int = 0  # number of weights in the group

    def trains_at(self, epoch: int) -> bool:
        return self.train_from is not None and epoch >= self.train_from

    def live_at(self, epoch: int) -> bool:
        """Some of its weights train at ``epoch`` (BN scale/shift of an 'affine' group train throughout)."""
        return self.trains_at(epoch) or self.bn == "affine"

    @property
    def bn_text(self) -> str:
        """What BatchNorm does in this group, in words."""
        if self.bn in ("-", "affine"):
            return {"-": "-", "affine": "stats fixed, scale/shift train"}[self.bn]
        stats = {"train": "stats from batches", "frozen": "stats fixed", "adapt": "stats re-estimated once"}[self.bn]
        return f"{stats}, scale/shift {'fixed' if self.train_from is None else 'train'}"


@dataclass
class Plan:
    """A freeze plan for one model: what trains at which epoch, at which rate, with which BN behaviour."""

    groups: list[GroupPlan]
    schedule: str = "none"
    reasons: list[str] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    adapted: bool = False  # BN statistics of 'adapt' groups already re-estimated

    @property
    def fixed_depth(self) -> int:
        """Leading groups that never train (the prefix that costs a forward pass only)."""
        return next((i for i, g in enumerate(self.groups) if g.train_from is not None or g.bn == "affine"),
                    len(self.groups))

    @property
    def is_probe(self) -> bool:
        """Only the head ever trains: a linear probe, whose features can be computed once."""
        return all(g.train_from is None and g.bn != "affine" for g in self.groups if g.kind != "head")

    @property
    def releases_later(self) -> bool:
        """Some group starts training after epoch 0 (LP-FT, gradual)."""
        return any(g.train_from not in (None, 0) for g in self.groups)

    def explain(self) -> str:
        """The reasons, with numbers, then the plan as a table."""
        lines = [f"- {r}" for r in self.reasons]
        width = max(len(g.name) for g in self.groups)
        lines += ["", f"{'group':<{width}}  {'weights':>10}  {'trains':<19}  {'lr':>7}  bn"]
        for g in self.groups:
            when = ("BN scale/shift only" if g.bn == "affine" else "never (fixed)") if g.train_from is None else (
                "from the start" if g.train_from == 0 else f"from epoch {g.train_from}")
            lr = f"{g.lr_mult:.2g}x" if g.train_from is not None or g.bn == "affine" else "-"
            lines.append(f"{g.name:<{width}}  {g.numel:>10,}  {when:<19}  {lr:>7}  {g.bn_text}")
        return "\n".join(lines)

    def check(self, model: torch.nn.Module) -> None:
        """Refuse a model whose parameters are not exactly the plan's."""
        planned, params = {p for g in self.groups for p in g.params}, {n for n, _ in model.named_parameters()}
        if planned != params:
            raise ValueError(f"this plan was made for another model: parameters not in the plan "
                             f"{sorted(params - planned)[:3]}, planned but absent {sorted(planned - params)[:3]}; "
                             f"make the plan from this model (finetune.freeze.auto)")

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> Plan:
        return cls(**{**state, "groups": [GroupPlan(**{**g, "params": tuple(g["params"]),
                                                        "modules": tuple(g["modules"])}) for g in state["groups"]]})

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(Plan.from_state_dict(state).__dict__)


def make_plan(model: torch.nn.Module, depth: int, *, base_mult: float = 0.1, decay: float = 1.0,
              bn_fixed: str = "frozen", bn_trained: str = "train", schedule: str = "none", epochs: int = 1,
              probe_epochs: int | None = None, reasons: Iterable[str] = (), inputs: dict | None = None) -> Plan:
    """A plan that fixes the first ``depth`` backbone groups and trains the rest at ``base_mult * decay**j`` of the
    head's rate (``j`` counting back from the head), released as ``schedule`` says (:func:`rule.releases`)."""
    if bn_fixed not in rule.BN_MODES or bn_trained not in rule.BN_MODES:
        raise ValueError(f"BN modes are {', '.join(rule.BN_MODES)}; got {bn_fixed!r} and {bn_trained!r}")
    st = stages(model)
    body = [s for s in st if s.kind != "head"]
    depth = max(0, min(int(depth), len(body)))
    schedule, starts, why = rule.releases(schedule, len(body) - depth, epochs, probe_epochs)
    numel = {n: p.numel() for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    groups = []
    for i, s in enumerate(st):
        has_bn = any(isinstance(m, _BN) for name in s.modules for m in modules[name].modules())
        back = len(body) - 1 - i  # 0 for the group next to the head
        start, mult, bn = (0, 1.0, bn_trained) if s.kind == "head" else (
            (None, base_mult * decay ** back if bn_fixed == "affine" else 0.0, bn_fixed) if i < depth
            else (starts[back], base_mult * decay ** back, bn_trained))
        groups.append(GroupPlan(s.name, s.kind, s.params, s.modules, start, mult, bn if has_bn else "-",
                                sum(numel[p] for p in s.params)))
    return Plan(groups=groups, schedule=schedule, reasons=[*reasons, *([why] if why else [])],
                inputs=dict(inputs or {}))


def n_body_groups(model: torch.nn.Module) -> int:
    """Number of backbone groups (every group but the head): the largest meaningful fixed depth."""
    return len([s for s in stages(model) if s.kind != "head"])


def from_decision(model: torch.nn.Module, d: rule.Decision) -> Plan:
    """The plan a decision makes for ``model`` (whose backbone has ``d.n_groups`` groups)."""
    fixed_names = [s.name for s in stages(model) if s.kind != "head"][:d.depth]
    return make_plan(model, d.depth, base_mult=d.base_mult, decay=d.decay, bn_fixed=d.bn_fixed,
                     bn_trained=d.bn_trained, schedule=d.schedule, epochs=d.epochs, probe_epochs=d.probe_epochs,
                     reasons=rule.explain(d, fixed_names, any(isinstance(m, _BN) for m in model.modules())),
                     inputs=d.inputs())


def auto(model: torch.nn.Module, *, n_train: int, n_classes: int, domain: str | None = None,
         distance: float | None = None, epochs: int = 5, batch_size: int = 32, bn: str = "auto", schedule: str = "auto",
         probe_epochs: int | None = None, lr_decay: float | None = None) -> Plan:
    """The automatic plan from dataset size and a measured ``distance`` to ImageNet (0-1) or a declared ``domain``;
    ``bn``/``schedule``/``lr_decay`` other than auto override that part of the decision."""
    d, source = rule.distance_of(domain, distance)
    return from_decision(model, rule.decide(n_train, n_classes, n_body_groups(model), distance=d, source=source,
                                            epochs=epochs, batch_size=batch_size, bn=bn, schedule=schedule,
                                            probe_epochs=probe_epochs, lr_decay=lr_decay))


def fixed(model: torch.nn.Module, depth: int, **kw) -> Plan:
    """Fix the first ``depth`` backbone groups (0: full fine-tuning; all groups: a linear probe)."""
    n = n_body_groups(model)
    what = "full fine-tuning" if depth <= 0 else ("a linear probe" if depth >= n else f"{depth} of {n} groups fixed")
    return make_plan(model, depth, reasons=[f"fixed depth chosen by hand: {what}."], **kw)


def probe(model: torch.nn.Module, **kw) -> Plan:
    """A linear probe: every backbone group fixed, only the head trains."""
    return fixed(model, 10_000, **kw)


def full(model: torch.nn.Module, **kw) -> Plan:
    """Full fine-tuning: every group trains from the start."""
    return fixed(model, 0, **kw)


def plan_for(model: torch.nn.Module, recipe: Recipe, n_train: int, n_classes: int, *,
             data: str | Path | None = None, csv: str | Path | None = None, per_class: float | None = None) -> Plan:
    """The plan for this data and recipe: automatic (``freeze.domain: measure`` measures on ``data``/``csv``) or by
    hand with the rule's BN modes; ``per_class`` (multi-label) replaces n_train / n_classes as the images a class."""
    f, t = recipe.freeze, recipe.train
    if f.domain == "measure":
        if data is None and csv is None:
            raise ValueError("freeze.domain: measure needs the images: pass data= or csv=")
        from ..domain import measure_folder
        report = measure_folder(data, recipe, csv=csv)
        log.info("measured distance to ImageNet: %.2f (%d images)", report.overall, report.n_images)
        distance, source = report.overall, "measured"
    else:
        distance, source = rule.distance_of(*((None, f.domain) if isinstance(f.domain, float) else (f.domain, None)))
    counted = ""
    if per_class is not None:
        counted = (f"multi-label: the mean number of the {n_train} training images that carry each of the {n_classes} "
                   f"labels; an image with several labels counts for each")
        n_classes = n_train / max(per_class, 1e-9)  # so that n_train / n_classes is the images a label
    d = rule.decide(n_train, n_classes, n_body_groups(model), distance=distance, source=source, epochs=t.epochs,
                    batch_size=t.batch_size, bn=f.bn, schedule=f.schedule, probe_epochs=f.probe_epochs,
                    lr_decay=f.lr_decay, counted=counted)
    if f.mode == "auto":
        return from_decision(model, d)
    return fixed(model, {"full": 0, "probe": 10_000}.get(f.mode, f.depth), bn_fixed=d.bn_fixed,
                 bn_trained=d.bn_trained, schedule="none" if f.schedule == "auto" else f.schedule, epochs=t.epochs,
                 probe_epochs=f.probe_epochs, inputs=d.inputs())
