"""The freeze policy: which stages stay fixed, at which learning rates the rest train, how BatchNorm behaves,
and when fixed stages are released; ``auto`` decides all of it from dataset size and distance to ImageNet.

A :class:`Plan` works on any timm model (see :func:`finetune.stages.stages`). Every stage is an optimizer
param group from the first step: freezing and unfreezing only flip ``requires_grad`` and the group's
learning-rate multiplier, so schedulers, checkpoints and DDP see one fixed optimizer (the failure mode of
add-param-group designs, Lightning issues 8720, 14674, 20340, 21901). The rule is documented in docs/freeze.md.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Literal

import torch

from .stages import Stage, stages

BN_MODES = ("train", "frozen", "adapt", "affine")
SCHEDULES = ("none", "lp-ft", "gradual")
#: Declared domains and the distance to ImageNet each stands for, as finetune.domain measures it (docs/distance.md):
#: hymenoptera, scikit-image's ihc tiles, bccd_cells and mitocheck_cells with tf_efficientnet_lite0.
DOMAINS = {"natural": 0.07, "histology": 0.25, "microscopy": 0.9, "fluorescence": 0.81}
ADAPT_FROM = 0.4  # distance from which a domain counts as far (the trade-off note)
RETRAIN_BN_FROM = 0.6  # trainable share from which trained groups re-estimate BN statistics (train mode) ...
RETRAIN_BN_PER_CLASS = 1000  # ... given this many training images a class (measured: docs/freeze.md)
_BN = (torch.nn.modules.batchnorm._BatchNorm,)
_HANDLES = "_finetune_hold_handles"


@dataclass
class GroupPlan:
    """What happens to one stage: when it starts training (None: never), its lr multiplier, its BN mode."""

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


@dataclass
class Plan:
    """A freeze plan for one model; ``apply`` it at each epoch, build the optimizer from ``param_groups``."""

    groups: list[GroupPlan]
    schedule: str = "none"
    reasons: list[str] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    adapted: bool = False  # BN statistics of 'adapt' groups already re-estimated

    # -- what the plan says -------------------------------------------------------------------------
    def trainable(self, epoch: int = 0) -> list[bool]:
        return [g.trains_at(epoch) for g in self.groups]

    def lr_mults(self, epoch: int = 0) -> list[float]:
        """Learning-rate multiplier of every group at ``epoch`` (0 while a group is fixed)."""
        return [g.lr_mult if g.trains_at(epoch) or g.bn == "affine" else 0.0 for g in self.groups]

    @property
    def fixed_depth(self) -> int:
        """Leading groups that never train (the prefix that costs a forward pass only)."""
        n = 0
        for g in self.groups:
            if g.train_from is not None or g.bn == "affine":
                break
            n += 1
        return n

    @property
    def is_probe(self) -> bool:
        """Only the head ever trains: a linear probe, whose features can be computed once."""
        return all(g.train_from is None and g.bn != "affine" for g in self.groups if g.kind != "head")

    def table(self) -> list[dict]:
        return [{"group": g.name, "weights": g.numel, "trains_from_epoch": g.train_from,
                 "lr_mult": round(g.lr_mult, 4), "bn": g.bn} for g in self.groups]

    def explain(self) -> str:
        """The reasons, with numbers, then the plan as a table."""
        lines = [f"- {r}" for r in self.reasons]
        width = max(len(g.name) for g in self.groups)
        lines.append("")
        lines.append(f"{'group':<{width}}  {'weights':>10}  {'trains':<19}  {'lr':>7}  bn")
        for g in self.groups:
            when = "never (fixed)" if g.train_from is None else ("from the start" if g.train_from == 0
                                                                 else f"from epoch {g.train_from}")
            if g.train_from is None and g.bn == "affine":
                when = "BN scale/shift only"
            lr = "-" if g.train_from is None and g.bn != "affine" else f"{g.lr_mult:.2g}x"
            lines.append(f"{g.name:<{width}}  {g.numel:>10,}  {when:<19}  {lr:>7}  {g.bn}")
        return "\n".join(lines)

    # -- acting on a model ----------------------------------------------------------------------------
    def param_groups(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """One optimizer param group per stage, all present from the start; ``lr`` is the head's rate."""
        params = dict(model.named_parameters())
        self._check(params)
        return [{"params": [params[p] for p in g.params], "name": g.name, "lr": lr * g.lr_mult,
                 "weight_decay": weight_decay} for g in self.groups]

    def apply(self, model: torch.nn.Module, epoch: int = 0) -> None:
        """Set ``requires_grad`` and BatchNorm behaviour of every group for ``epoch``.

        Fixed groups are held in eval mode (BN statistics, dropout and drop-path off) by a forward pre-hook, so
        the hold survives ``model.train()``, which Lightning calls every epoch.
        """
        params = dict(model.named_parameters())
        self._check(params)
        modules = dict(model.named_modules())
        for h in getattr(model, _HANDLES, []):
            h.remove()
        handles = []
        for g in self.groups:
            live = g.trains_at(epoch)
            bn_params = set()
            for m in g.modules:
                for sub, mod in modules[m].named_modules():
                    if isinstance(mod, _BN):
                        prefix = f"{m}.{sub}" if sub else m
                        bn_params.update(f"{prefix}.{p}" for p, _ in mod.named_parameters(recurse=False))
            for name in g.params:
                params[name].requires_grad_(live or (g.bn == "affine" and name in bn_params))
            for m in g.modules:
                for mod in modules[m].modules():
                    is_bn = isinstance(mod, _BN)
                    if (not live and not is_bn) or (is_bn and g.bn != "train"):
                        handles.append(mod.register_forward_pre_hook(_hold_eval))
                    else:
                        mod.training = model.training
        setattr(model, _HANDLES, handles)

    def prepare(self, model: torch.nn.Module) -> None:
        """Before wrapping for DDP: parameters that never train need no gradient, every other one does, so DDP
        registers exactly the parameters the schedule may release (those still fixed then count as unused)."""
        params = dict(model.named_parameters())
        self._check(params)
        for g in self.groups:
            never = g.train_from is None and g.bn != "affine"
            for name in g.params:
                params[name].requires_grad_(not never)

    @property
    def releases_later(self) -> bool:
        """Some group starts training after epoch 0 (LP-FT, gradual)."""
        return any(g.train_from not in (None, 0) for g in self.groups)

    def adapt_bn(self, model: torch.nn.Module, batches: Iterable[torch.Tensor], max_batches: int = 50) -> int:
        """AdaBN: re-estimate the running statistics of the 'adapt' groups on target images, then fix them.

        Returns the number of images seen. Earlier stages run as the plan says (fixed ones in eval mode).
        """
        modules = dict(model.named_modules())
        bns = [mod for g in self.groups if g.bn == "adapt" for m in g.modules
               for mod in modules[m].modules() if isinstance(mod, _BN)]
        if not bns:
            self.adapted = True
            return 0
        was_training = model.training
        model.eval()
        saved = []
        for bn in bns:
            saved.append(bn.momentum)
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over all batches seen
            bn.train()
        hooks = [bn.register_forward_pre_hook(_train_mode) for bn in bns]
        seen = 0
        device = next(model.parameters()).device
        with torch.no_grad():
            for i, x in enumerate(batches):
                if i >= max_batches:
                    break
                x = x[0] if isinstance(x, (list, tuple)) else x
                model(x.to(device))
                seen += len(x)
        for h in hooks:
            h.remove()
        for bn, m in zip(bns, saved):
            bn.momentum = m
        model.train(was_training)
        self.adapted = True
        return seen

    def _check(self, params: dict) -> None:
        planned = {p for g in self.groups for p in g.params}
        if planned != set(params):
            missing = sorted(set(params) - planned)[:3]
            extra = sorted(planned - set(params))[:3]
            raise ValueError(f"this plan was made for another model: parameters not in the plan {missing}, "
                             f"planned but absent {extra}; make the plan from this model (finetune.freeze.auto)")

    # -- persistence ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"groups": [asdict(g) for g in self.groups], "schedule": self.schedule,
                "reasons": list(self.reasons), "inputs": dict(self.inputs), "adapted": self.adapted}

    @classmethod
    def from_state_dict(cls, state: dict) -> Plan:
        groups = [GroupPlan(**{**g, "params": tuple(g["params"]), "modules": tuple(g["modules"])})
                  for g in state["groups"]]
        return cls(groups=groups, schedule=state["schedule"], reasons=list(state["reasons"]),
                   inputs=dict(state["inputs"]), adapted=bool(state["adapted"]))

    def load_state_dict(self, state: dict) -> None:
        other = Plan.from_state_dict(state)
        self.groups, self.schedule, self.reasons = other.groups, other.schedule, other.reasons
        self.inputs, self.adapted = other.inputs, other.adapted


def _hold_eval(module: torch.nn.Module, args) -> None:
    module.training = False


def _train_mode(module: torch.nn.Module, args) -> None:
    module.training = True


def release(model: torch.nn.Module) -> None:
    """Remove the plan's hooks (before export); BN and dropout then follow ``model.train()/eval()`` again."""
    for h in getattr(model, _HANDLES, []):
        h.remove()
    setattr(model, _HANDLES, [])


# ---------------------------------------------------------------------------------------------------------
# Building plans
# ---------------------------------------------------------------------------------------------------------
def make_plan(model: torch.nn.Module, depth: int, *, base_mult: float = 0.1, decay: float = 1.0,
              bn_fixed: str = "frozen", bn_trained: str = "train", schedule: str = "none",
              epochs: int = 1, probe_epochs: int | None = None, reasons: Iterable[str] = (),
              inputs: dict | None = None) -> Plan:
    """A plan that fixes the first ``depth`` backbone groups and trains the rest.

    Trained backbone groups get ``base_mult * decay**j`` of the head's learning rate, ``j`` counting back from
    the group next to the head (discriminative rates). ``schedule`` 'lp-ft' trains only the head for
    ``probe_epochs``, then releases every trainable group; 'gradual' releases one group per epoch from the top.
    """
    if bn_fixed not in BN_MODES or bn_trained not in BN_MODES:
        raise ValueError(f"BN modes are {', '.join(BN_MODES)}; got {bn_fixed!r} and {bn_trained!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    st: list[Stage] = stages(model)
    body = [s for s in st if s.kind != "head"]
    depth = max(0, min(int(depth), len(body)))
    n_train = len(body) - depth
    if schedule != "none" and n_train == 0:
        schedule = "none"
    probe = probe_epochs if probe_epochs is not None else max(1, round(0.2 * epochs))
    if schedule == "lp-ft" and probe >= epochs:
        probe = max(0, epochs - 1)
    numel = {n: p.numel() for n, p in model.named_parameters()}
    groups = []
    for i, s in enumerate(st):
        size = sum(numel[p] for p in s.params)
        if s.kind == "head":
            groups.append(GroupPlan(s.name, s.kind, s.params, s.modules, 0, 1.0, bn_trained, size))
            continue
        back = len(body) - 1 - i  # 0 for the group next to the head
        if i < depth:
            mult = base_mult * decay ** back if bn_fixed == "affine" else 0.0
            groups.append(GroupPlan(s.name, s.kind, s.params, s.modules, None, mult, bn_fixed, size))
            continue
        start = {"none": 0, "lp-ft": probe, "gradual": back + 1}[schedule]
        groups.append(GroupPlan(s.name, s.kind, s.params, s.modules, start, base_mult * decay ** back, bn_trained,
                                size))
    return Plan(groups=groups, schedule=schedule, reasons=list(reasons), inputs=dict(inputs or {}))


def data_score(n_train: int, n_classes: int) -> float:
    """How much labelled data there is, on a log scale: 1 image a class -> 0, 1000 or more -> 1."""
    per_class = max(n_train, 1) / max(n_classes, 1)
    return min(1.0, max(0.0, math.log10(per_class) / 3))


def bn_policy(share: float, batch_size: int = 32, per_class: float = math.inf) -> tuple[str, str]:
    """BN modes (fixed groups, trained groups): ImageNet's statistics everywhere, except trained groups of a
    plan that moves most of the network (share >= RETRAIN_BN_FROM), from RETRAIN_BN_PER_CLASS images a class and
    with batches of 16 or more."""
    retrain = share >= RETRAIN_BN_FROM and per_class >= RETRAIN_BN_PER_CLASS and batch_size >= 16
    return "frozen", ("train" if retrain else "frozen")


def trainable_share(n_train: int, n_classes: int, distance: float) -> float:
    """Share of backbone groups to fine-tune: data score times (0.5 + distance), capped at 1.

    Monotone: more data or a farther domain never fixes more. Data bounds the share (few examples cannot
    support many free weights whatever the domain); distance scales what the data allows.
    """
    return min(1.0, data_score(n_train, n_classes) * (0.5 + distance))


def auto(model: torch.nn.Module, *, n_train: int, n_classes: int, domain: str | None = None,
         distance: float | None = None, epochs: int = 5, batch_size: int = 32,
         bn: str = "auto", schedule: str = "auto", probe_epochs: int | None = None,
         lr_decay: float | None = None) -> Plan:
    """The automatic plan for ``model`` from dataset size and distance to ImageNet (declared or measured).

    Pass ``distance`` (0 = ImageNet itself, 1 = nothing alike; from :func:`finetune.domain.distance`) or a
    declared ``domain`` (natural, histology, microscopy, fluorescence). ``bn``/``schedule``/``lr_decay`` other
    than auto override that part of the decision.
    """
    if distance is None:
        if domain is None:
            raise ValueError("auto() needs distance= (measured) or domain= (one of "
                             f"{', '.join(DOMAINS)}); measure it with finetune.domain.distance(model, images)")
        if domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}; use one of {', '.join(DOMAINS)} or pass distance=")
        d, source = DOMAINS[domain], f"declared '{domain}'"
    else:
        if not 0.0 <= distance <= 1.0:
            raise ValueError(f"distance {distance} must be in [0, 1]")
        d, source = float(distance), "measured"
    st = stages(model)
    body = [s for s in st if s.kind != "head"]
    per_class = n_train / max(n_classes, 1)
    s = data_score(n_train, n_classes)
    share = trainable_share(n_train, n_classes, d)
    k = round(share * len(body))
    depth = len(body) - k
    base = 0.1 + 0.3 * d
    decay = lr_decay if lr_decay is not None else 0.6 + 0.3 * d
    bn_fixed, bn_trained = bn_policy(share, batch_size, per_class) if bn == "auto" else (bn, bn)
    sched = ("lp-ft" if k > 0 and epochs >= 3 else "none") if schedule == "auto" else schedule
    far = ("far from ImageNet's natural photos" if d >= 0.6 else
           "midway between ImageNet's natural photos and far domains such as microscopy" if d >= ADAPT_FROM else
           "close to ImageNet's natural photos")
    reasons = [
        f"{per_class:.0f} images a class ({n_train} training images, {n_classes} classes): data score {s:.2f} "
        f"(log scale: 1 image a class is 0, 1000 is 1). Fewer examples: more weights stay fixed.",
        f"distance to ImageNet {d:.2f} ({source}): {far}. Farther: more of the "
        f"network must change, earlier stages included.",
        f"share of the {len(body)} backbone groups to fine-tune = data score x (0.5 + distance) = "
        f"{s:.2f} x {0.5 + d:.2f} = {share:.2f}, so the top {k} train and the first {depth} stay fixed"
        + (" (a linear probe: only the new head learns)." if k == 0 else "."),
    ]
    if depth:
        fixed = ", ".join(g.name for g in body[:depth])
        how = {"adapt": "their BatchNorm statistics are re-estimated on your images, then fixed (AdaBN)",
               "train": "their BatchNorm statistics follow your batches",
               "affine": "only their BatchNorm scale and shift train"}.get(bn_fixed, "their BatchNorm statistics "
                                                                         "stay ImageNet's")
        reasons.append(f"fixed: {fixed}; {how}.")
    if k and bn == "auto":
        if bn_trained == "train":
            why = (f"statistics re-estimated from your batches while they train (share {share:.2f} >= "
                   f"{RETRAIN_BN_FROM} and {per_class:.0f} >= {RETRAIN_BN_PER_CLASS} images a class: most of the "
                   f"network moves, with enough images to estimate its statistics).")
        else:
            short = [f"share {share:.2f} < {RETRAIN_BN_FROM}"] if share < RETRAIN_BN_FROM else []
            short += [f"{per_class:.0f} < {RETRAIN_BN_PER_CLASS} images a class"] if per_class < RETRAIN_BN_PER_CLASS else []
            short += [f"batches of {batch_size} < 16"] if batch_size < 16 else []
            why = (f"ImageNet's statistics kept, scale and shift train ({' and '.join(short)}: statistics "
                   f"re-estimated from few images are noisier than ImageNet's and differ between training and "
                   f"evaluation; measured, they cost accuracy at 10 and 100 images a class).")
        reasons.append("BatchNorm in the trained groups: " + why)
    if k:
        reasons.append(
            f"trained backbone groups learn at {base:.2f}x the head's rate next to the head, x{decay:.2f} per group "
            f"further down (farther domains get higher rates and less decay): fine-tuning uses a lower learning "
            f"rate than training from scratch.")
    if sched == "lp-ft":
        p = probe_epochs if probe_epochs is not None else max(1, round(0.2 * epochs))
        reasons.append(f"schedule: linear probe for {min(p, epochs - 1)} epoch(s), then the trained groups are released "
                       "(LP-FT): a random head first would push noisy gradients into the pretrained features.")
    elif sched == "gradual":
        reasons.append("schedule: gradual unfreezing, one group per epoch from the head down.")
    if d >= ADAPT_FROM and s < 0.5:
        reasons.append("trade-off: the domain asks for more fine-tuning than the data can support; the data wins. "
                       "The share is a product, so few examples cap it whatever the distance, and BatchNorm keeps "
                       "ImageNet's statistics: re-estimating them from so few images cost accuracy in every "
                       "measured case (docs/freeze.md).")
    inputs = {"n_train": n_train, "n_classes": n_classes, "distance": d, "distance_source": source,
              "data_score": s, "share": share, "epochs": epochs, "batch_size": batch_size}
    return make_plan(model, depth, base_mult=base, decay=decay, bn_fixed=bn_fixed, bn_trained=bn_trained,
                     schedule=sched, epochs=epochs, probe_epochs=probe_epochs, reasons=reasons, inputs=inputs)


def fixed(model: torch.nn.Module, depth: int, **kw) -> Plan:
    """Fix the first ``depth`` backbone groups (0: full fine-tuning; all groups: a linear probe)."""
    n = len([s for s in stages(model) if s.kind != "head"])
    what = "full fine-tuning" if depth <= 0 else ("a linear probe" if depth >= n else f"{depth} of {n} groups fixed")
    return make_plan(model, depth, reasons=[f"fixed depth chosen by hand: {what}."], **kw)


def probe(model: torch.nn.Module, **kw) -> Plan:
    """A linear probe: every backbone group fixed, only the head trains."""
    return fixed(model, 10_000, **kw)


def full(model: torch.nn.Module, **kw) -> Plan:
    """Full fine-tuning: every group trains from the start."""
    return fixed(model, 0, **kw)


def n_body_groups(model: torch.nn.Module) -> int:
    """Number of backbone groups (every group but the head): the largest meaningful fixed depth."""
    return len([s for s in stages(model) if s.kind != "head"])


Mode = Literal["auto", "full", "probe", "fixed"]
__all__ = ["Plan", "GroupPlan", "auto", "fixed", "probe", "full", "make_plan", "release", "data_score",
           "trainable_share", "n_body_groups", "DOMAINS", "BN_MODES", "SCHEDULES", "replace"]
