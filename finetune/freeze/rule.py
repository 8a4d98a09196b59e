"""The automatic freeze rule: a pure decision from data size, classes, distance to ImageNet, epochs and batch size,
and :func:`explain`, which says why in words and numbers. The rule is documented in docs/freeze.md."""
from __future__ import annotations

import math
from dataclasses import dataclass

BN_MODES = ("train", "frozen", "adapt", "affine")
SCHEDULES = ("none", "lp-ft", "gradual")
#: Declared domains and the distance to ImageNet each stands for, as finetune.domain measures it (docs/distance.md):
#: hymenoptera, scikit-image's ihc tiles, bccd_cells and mitocheck_cells with tf_efficientnet_lite0.
DOMAINS = {"natural": 0.07, "histology": 0.25, "microscopy": 0.9, "fluorescence": 0.81}
ADAPT_FROM = 0.4  # distance from which a domain counts as far (the trade-off note)
RETRAIN_BN_FROM = 0.6  # trainable share from which trained groups re-estimate BN statistics (train mode) ...
RETRAIN_BN_PER_CLASS = 1000  # ... given this many training images a class (measured: docs/freeze.md) ...
RETRAIN_BN_BATCH = 16  # ... and batches of at least this many images


def data_score(n_train: int, n_classes: int) -> float:
    """How much labelled data there is, on a log scale: 1 image a class -> 0, 1000 or more -> 1."""
    per_class = max(n_train, 1) / max(n_classes, 1)
    return min(1.0, max(0.0, math.log10(per_class) / 3))


def trainable_share(n_train: int, n_classes: int, distance: float) -> float:
    """Share of backbone groups to fine-tune: data score times (0.5 + distance), capped at 1. Data bounds the share
    (few examples cannot support many free weights); distance scales what the data allows."""
    return min(1.0, data_score(n_train, n_classes) * (0.5 + distance))


def bn_policy(share: float, batch_size: int = 32, per_class: float = math.inf) -> tuple[str, str]:
    """BN modes (fixed groups, trained groups): ImageNet's statistics everywhere, except trained groups of a plan
    that moves most of the network, with enough images a class and large enough batches (the RETRAIN_BN_* limits)."""
    retrain = share >= RETRAIN_BN_FROM and per_class >= RETRAIN_BN_PER_CLASS and batch_size >= RETRAIN_BN_BATCH
    return "frozen", ("train" if retrain else "frozen")


def distance_of(domain: str | None, distance: float | None) -> tuple[float, str]:
    """The distance to use and where it came from: measured (``distance``) or declared (``domain``)."""
    if distance is not None:
        if not 0.0 <= distance <= 1.0:
            raise ValueError(f"distance {distance} must be in [0, 1]")
        return float(distance), "measured"
    if domain is None:
        raise ValueError("the automatic plan needs distance= (measured) or domain= (one of "
                         f"{', '.join(DOMAINS)}); measure it with finetune.domain.distance(model, images)")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; use one of {', '.join(DOMAINS)} or pass distance=")
    return DOMAINS[domain], f"declared '{domain}'"


def releases(schedule: str, n_trained: int, epochs: int, probe_epochs: int | None = None) -> tuple[str, list[int], str]:
    """(schedule, start epoch of each trained backbone group from the head down, the sentence that says so); every
    group starts by epoch ``epochs - 2`` so it trains at least two epochs (fewer than 3 epochs: no schedule)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if schedule == "none" or n_trained == 0:
        return "none", [0] * n_trained, ""
    last = epochs - 2
    if last < 1:
        return "none", [0] * n_trained, (f"schedule: none; {schedule} needs at least 3 epochs (a group released in "
                                         f"the last epoch would train for one epoch only), this run has {epochs}.")
    if schedule == "lp-ft":
        want = probe_epochs if probe_epochs is not None else max(1, round(0.2 * epochs))
        p = min(max(0, want), last)
        capped = f" (capped from {want}: a group must start before the last epoch)" if p < want else ""
        return "lp-ft", [p] * n_trained, (
            f"schedule: linear probe for {p} epoch(s){capped}, then the trained groups are released (LP-FT): a "
            "random head first would push noisy gradients into the pretrained features.")
    late = max(0, n_trained - last)
    capped = (f"; the {late} group(s) that would start at or after the last epoch start at epoch {last} instead, "
              f"so every group trains at least two of the {epochs} epochs" if late else "")
    starts = [min(j + 1, last) for j in range(n_trained)]
    return "gradual", starts, f"schedule: gradual unfreezing, one group per epoch from the head down{capped}."


@dataclass(frozen=True)
class Decision:
    """What the rule decided (fixed groups, their rates, BN modes, schedule), with the numbers it used."""

    n_train: int
    n_classes: int
    distance: float
    source: str  # "measured" or "declared '<domain>'"
    n_groups: int  # backbone groups (every group but the head)
    epochs: int
    batch_size: int
    depth: int  # leading backbone groups that stay fixed
    base_mult: float  # lr multiplier of the group next to the head
    decay: float  # further multiplier per group down
    bn_fixed: str
    bn_trained: str
    schedule: str
    probe_epochs: int | None
    bn_chosen: bool = True  # the BN modes came from the rule, not from the recipe
    counted: str = ""  # how images a class were counted, when not n_train / n_classes (multi-label)

    per_class = property(lambda self: self.n_train / max(self.n_classes, 1))
    score = property(lambda self: data_score(self.n_train, self.n_classes))
    share = property(lambda self: trainable_share(self.n_train, self.n_classes, self.distance))

    def inputs(self) -> dict:
        return {"n_train": self.n_train, "n_classes": self.n_classes, "distance": self.distance,
                "distance_source": self.source, "data_score": self.score, "share": self.share,
                "epochs": self.epochs, "batch_size": self.batch_size}


def decide(n_train: int, n_classes: int, n_groups: int, *, distance: float, source: str = "measured",
           epochs: int = 5, batch_size: int = 32, bn: str = "auto", schedule: str = "auto",
           probe_epochs: int | None = None, lr_decay: float | None = None, counted: str = "") -> Decision:
    """The automatic decision for ``n_groups`` backbone groups; ``bn``/``schedule``/``lr_decay`` override its parts."""
    share = trainable_share(n_train, n_classes, distance)
    k = round(share * n_groups)
    if bn == "auto":
        bn_fixed, bn_trained = bn_policy(share, batch_size, n_train / max(n_classes, 1))
    elif bn in BN_MODES:
        bn_fixed = bn_trained = bn
    else:
        raise ValueError(f"BN mode {bn!r} is not one of auto, {', '.join(BN_MODES)}")
    sched = ("lp-ft" if k > 0 and epochs >= 3 else "none") if schedule == "auto" else schedule
    return Decision(n_train, n_classes, distance, source, n_groups, epochs, batch_size, depth=n_groups - k,
                    base_mult=0.1 + 0.3 * distance, decay=lr_decay if lr_decay is not None else 0.6 + 0.3 * distance,
                    bn_fixed=bn_fixed, bn_trained=bn_trained, schedule=sched, probe_epochs=probe_epochs,
                    bn_chosen=bn == "auto", counted=counted)


def explain(d: Decision, fixed_names: list[str] = (), has_bn: bool = True) -> list[str]:
    """The reasons for a decision, with its numbers (the schedule's comes from :func:`releases`); nothing about
    BatchNorm for a model without it (``has_bn``)."""
    far = ("far from ImageNet's natural photos" if d.distance >= 0.6 else
           "midway between ImageNet's natural photos and far domains such as microscopy"
           if d.distance >= ADAPT_FROM else "close to ImageNet's natural photos")
    k = d.n_groups - d.depth
    reasons = [
        f"{d.per_class:.0f} images a class ({d.counted or f'{d.n_train} training images, {d.n_classes} classes'}): "
        f"data score {d.score:.2f} (log scale: 1 image a class is 0, 1000 is 1). Fewer examples: more weights stay "
        f"fixed.",
        f"distance to ImageNet {d.distance:.2f} ({d.source}): {far}. Farther: more of the network must change, "
        f"earlier stages included.",
        f"share of the {d.n_groups} backbone groups to fine-tune = data score x (0.5 + distance) = "
        f"{d.score:.2f} x {0.5 + d.distance:.2f} = {d.share:.2f}, so the top {k} train and the first {d.depth} stay "
        f"fixed" + (" (a linear probe: only the new head learns)." if k == 0 else "."),
    ]
    if d.depth:
        how = {"adapt": "; their BatchNorm statistics are re-estimated on your images, then fixed (AdaBN)",
               "train": "; their BatchNorm statistics follow your batches",
               "affine": "; only their BatchNorm scale and shift train",
               "frozen": "; their BatchNorm statistics stay ImageNet's"}[d.bn_fixed] if has_bn else ""
        reasons.append(f"fixed: {', '.join(fixed_names) or f'the first {d.depth} groups'}{how}.")
    if k and has_bn and d.bn_chosen:
        if d.bn_trained == "train":
            why = (f"statistics re-estimated from your batches while they train (share {d.share:.2f} >= "
                   f"{RETRAIN_BN_FROM} and {d.per_class:.0f} >= {RETRAIN_BN_PER_CLASS} images a class, batches of "
                   f"{d.batch_size} >= {RETRAIN_BN_BATCH}: most of the network moves, with enough images to estimate "
                   f"its statistics).")
        else:
            short = [text for text, low in [(f"share {d.share:.2f} < {RETRAIN_BN_FROM}", d.share < RETRAIN_BN_FROM),
                (f"{d.per_class:.0f} < {RETRAIN_BN_PER_CLASS} images a class", d.per_class < RETRAIN_BN_PER_CLASS),
                (f"batches of {d.batch_size} < {RETRAIN_BN_BATCH}", d.batch_size < RETRAIN_BN_BATCH)] if low]
            why = (f"ImageNet's statistics kept, scale and shift train ({' and '.join(short)}: statistics "
                   f"re-estimated from few images are noisier than ImageNet's and differ between training and "
                   f"evaluation; measured, they cost accuracy at 10 and 100 images a class).")
        reasons.append("BatchNorm in the trained groups: " + why)
    if k:
        reasons.append(
            f"trained backbone groups learn at {d.base_mult:.2f}x the head's rate next to the head, x{d.decay:.2f} per "
            f"group further down (farther domains get higher rates and less decay): fine-tuning uses a lower "
            f"learning rate than training from scratch.")
    if d.distance >= ADAPT_FROM and d.score < 0.5:
        reasons.append("trade-off: the domain asks for more fine-tuning than the data can support; the data wins. "
                       "The share is a product, so few examples cap it whatever the distance"
                       + (", and BatchNorm keeps ImageNet's statistics: re-estimating them from so few images cost "
                          "accuracy in every measured case (docs/freeze.md)." if has_bn else "."))
    return reasons
