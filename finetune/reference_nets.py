"""The lecture's reference conv nets, LeNet-5 (1998) and AlexNet (2012), with one named child per lecture layer so
that a size report has one row (and stage) each."""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

from torch import nn

#: Input size (C, H, W) each reference net was designed for.
REFERENCE_INPUT_SIZES: dict[str, tuple[int, int, int]] = {"lenet5": (1, 32, 32), "alexnet": (3, 224, 224)}


def lenet5(num_classes: int = 10) -> nn.Sequential:
    """LeNet-5 (LeCun et al. 1998) as the lecture counts it (C3 fully connected to S2); tanh, average pooling and a
    linear output stand in for the paper's scaled tanh, trainable subsampling and RBF units (same counts)."""
    return nn.Sequential(OrderedDict([
        ("C1", nn.Conv2d(1, 6, 5)), ("C1_act", nn.Tanh()), ("S2", nn.AvgPool2d(2)),
        ("C3", nn.Conv2d(6, 16, 5)), ("C3_act", nn.Tanh()), ("S4", nn.AvgPool2d(2)),
        ("flatten", nn.Flatten()),
        ("F5", nn.Linear(16 * 5 * 5, 120)), ("F5_act", nn.Tanh()),
        ("F6", nn.Linear(120, 84)), ("F6_act", nn.Tanh()),
        ("output", nn.Linear(84, num_classes)),
    ]))


def alexnet(num_classes: int = 1000) -> nn.Sequential:
    """AlexNet (Krizhevsky et al. 2012), the two-GPU version (conv2, conv4, conv5 grouped), with LRN and overlapping
    pooling; conv1 padding 2 gives the paper's 55x55 maps from 224x224 (as torchvision)."""
    relu = partial(nn.ReLU, inplace=True)
    lrn = partial(nn.LocalResponseNorm, 5, alpha=1e-4, beta=0.75, k=2.0)
    pool = partial(nn.MaxPool2d, 3, stride=2)  # overlapping
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 96, 11, stride=4, padding=2)), ("relu1", relu()), ("lrn1", lrn()), ("pool1", pool()),
        ("conv2", nn.Conv2d(96, 256, 5, padding=2, groups=2)), ("relu2", relu()), ("lrn2", lrn()), ("pool2", pool()),
        ("conv3", nn.Conv2d(256, 384, 3, padding=1)), ("relu3", relu()),
        ("conv4", nn.Conv2d(384, 384, 3, padding=1, groups=2)), ("relu4", relu()),
        ("conv5", nn.Conv2d(384, 256, 3, padding=1, groups=2)), ("relu5", relu()), ("pool5", pool()),
        ("flatten", nn.Flatten()),
        ("drop6", nn.Dropout()), ("fc6", nn.Linear(256 * 6 * 6, 4096)), ("relu6", relu()),
        ("drop7", nn.Dropout()), ("fc7", nn.Linear(4096, 4096)), ("relu7", relu()),
        ("fc8", nn.Linear(4096, num_classes)),
    ]))


def reference_model(name: str) -> nn.Module:
    """The reference net called ``name`` ('lenet5' or 'alexnet'), tagged with its name and input size the way timm
    tags its models (``pretrained_cfg``), so that size reports find both."""
    builders = {"lenet5": lenet5, "alexnet": alexnet}
    if name not in builders:
        raise ValueError(f"unknown reference model {name!r}; choose from {sorted(builders)}")
    net = builders[name]()
    net.pretrained_cfg = {"architecture": name, "input_size": REFERENCE_INPUT_SIZES[name]}  # as timm models carry
    return net
