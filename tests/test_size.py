"""Size report: the lecture's LeNet table, the counting rules, torch's own counter, freeze splits, the plot."""
from __future__ import annotations

import matplotlib.image
import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from finetune.size import CONV, LINEAR, inspect_model, reference_model

LECTURE_LENET = [  # name, type, units, connections, weights: the lecture's table, cell for cell
    ("C1", "convolution", 4704, 117_600, 150),
    ("S2", "pooling", 1176, 4704, 0),
    ("C3", "convolution", 1600, 240_000, 2400),
    ("S4", "pooling", 400, 1600, 0),
    ("F5", "fully connected", 120, 48_000, 48_000),
    ("F6", "fully connected", 84, 10_080, 10_080),
    ("output", "fully connected", 10, 840, 840),
]


def _rows(report) -> dict:
    return {r["name"]: r for r in report.layers.to_dict("records")}


def test_lenet_reproduces_lecture_table():
    layers = inspect_model(reference_model("lenet5"), input_size=(1, 32, 32)).layers
    got = list(layers[["name", "type", "units", "connections", "weights"]].itertuples(index=False, name=None))
    assert got == LECTURE_LENET
    assert layers["biases_bn"].tolist() == [6, 0, 16, 0, 120, 84, 10]  # biases shown apart


def test_alexnet_counts():
    report = inspect_model("alexnet")
    layers = report.layers
    assert report.totals.loc["total", "weights"] == 60_954_656
    assert layers.loc[layers["type"] != "pooling", "units"].sum() == 659_272
    assert layers.loc[layers["type"].isin([CONV, LINEAR]), "connections"].sum() == 724_406_816
    assert _rows(report)["conv2"]["weights"] == 256 * 48 * 5 * 5  # grouped: each tower sees 48 channels


def test_grouped_and_depthwise_convolutions():
    net = nn.Sequential()
    net.add_module("grouped", nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4))  # 10x10 -> 5x5
    net.add_module("depthwise", nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False))
    net.add_module("pointwise", nn.Conv2d(16, 4, 1))
    rows = _rows(inspect_model(net, input_size=(8, 10, 10)))
    assert (rows["grouped"]["units"], rows["grouped"]["weights"]) == (5 * 5 * 16, 3 * 3 * 8 * 16 // 4)
    assert rows["grouped"]["connections"] == 5 * 5 * 3 * 3 * 8 * 16 // 4
    assert (rows["depthwise"]["weights"], rows["depthwise"]["connections"]) == (9 * 16, 5 * 5 * 9 * 16)
    assert (rows["pointwise"]["weights"], rows["pointwise"]["biases_bn"]) == (16 * 4, 4)
    assert rows["pointwise"]["connections"] == 5 * 5 * 16 * 4


def test_pooling_rule():
    net = nn.Sequential()
    net.add_module("max", nn.MaxPool2d(3, stride=2))  # 4x9x9 -> 4x4x4
    net.add_module("avg", nn.AvgPool2d(2))  # -> 4x2x2
    net.add_module("gap", nn.AdaptiveAvgPool2d(1))  # -> 4x1x1
    rows = _rows(inspect_model(net, input_size=(4, 9, 9)))
    assert [(rows[n]["units"], rows[n]["connections"]) for n in ("max", "avg", "gap")] == [
        (64, 64 * 9), (16, 16 * 4), (4, 16)]
    assert all(rows[n]["weights"] + rows[n]["biases_bn"] == 0 for n in rows)


def test_lenet_frozen_prefix_costs():
    model = reference_model("lenet5")
    for p in [*model.C1.parameters(), *model.C3.parameters()]:
        p.requires_grad_(False)
    report = inspect_model(model, input_size=(1, 32, 32))
    totals, layers = report.totals, report.layers
    assert totals.loc["frozen", "params"] == 150 + 6 + 2400 + 16
    assert totals.loc["trainable", "params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert totals.loc["frozen", "connections"] == 117_600 + 4704 + 240_000 + 1600
    assert layers["trainable"].tolist() == [False] * 4 + [True] * 3
    # F5: weight gradient only (nothing trainable before it); F6 and output: input and weight gradients
    assert totals.loc["total", "bwd_ops"] == 48_000 + 2 * 10_080 + 2 * 840
    assert totals.loc["total", "fwd_ops"] == 422_824
    assert totals.loc["total", "saved_units"] == 400 + 120 + 84 + 10  # S4 feeds F5's weight gradient


def test_lenet_full_training_costs_and_mixed_layer():
    model = reference_model("lenet5")
    full = inspect_model(model, input_size=(1, 32, 32)).totals.loc["total"]
    # about 3 per connection: C1 has no input gradient to compute, pooling has no weight gradient
    assert full["bwd_ops"] == 2 * 422_824 - 117_600 - 4704 - 1600
    assert full["saved_units"] == full["units"] == 8094
    model.C1.weight.requires_grad_(False)  # bias still trainable: the layer is mixed
    report = inspect_model(model, input_size=(1, 32, 32))
    assert report.totals.loc["frozen", "weights"] == 150 and report.totals.loc["frozen", "biases_bn"] == 0
    assert report.totals.loc["total", "bwd_ops"] == full["bwd_ops"] - 117_600


def _timm(name: str) -> nn.Module:
    kwargs = {"img_size": 64} if name.startswith("vit") else {}
    return timm.create_model(name, pretrained=False, **kwargs)


def test_timm_frozen_prefixes_add_up():
    from finetune.stages import stages

    model = _timm("resnet18").train()
    groups = stages(model)
    params = dict(model.named_parameters())
    bwd = []
    for k in range(len(groups)):
        for g in groups[:k]:
            for p in g.params:
                params[p].requires_grad_(False)
        report = inspect_model(model, input_size=(3, 64, 64))
        t = report.totals
        assert (t.loc["frozen"] + t.loc["trainable"] == t.loc["total"]).all()
        assert t.loc["trainable", "params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert t.loc["total", "params"] == sum(p.numel() for p in model.parameters())
        assert (report.stages[["units", "params", "connections", "bwd_ops"]].sum()
                == t.loc["total", ["units", "params", "connections", "bwd_ops"]]).all()
        bwd.append(t.loc["total", "bwd_ops"])
    assert all(a > b for a, b in zip(bwd, bwd[1:]))
    assert bwd[-1] == 512 * 1000  # only the head trains: its weight gradient, no input gradient
    assert model.training and all(m.training for m in model.modules())  # probe left the modes as they were


FAMILIES = ["resnet18", "tf_efficientnet_lite0", "mobilenetv3_small_100", "convnext_atto", "regnetx_002",
            "vit_tiny_patch16_224"]


@pytest.mark.parametrize("name", FAMILIES)
def test_connections_match_torch_flop_counter(name):
    """Torch counts 2 FLOPs per multiply-add of convolutions and matrix products only (pooling, norms and
    activations count 0), so its conv+mm FLOPs / 2 must equal the conv+linear connections."""
    model = _timm(name).eval()
    report = inspect_model(model, input_size=(3, 64, 64))
    ours = report.layers.loc[report.layers["type"].isin([CONV, LINEAR]), "connections"].sum()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    aten = torch.ops.aten
    flops = counter.get_flop_counts()["Global"]
    torch_macs = sum(v for op, v in flops.items() if op in (aten.convolution, aten.mm, aten.addmm)) / 2
    assert abs(ours - torch_macs) <= 0.01 * torch_macs, (ours, torch_macs)
    assert report.totals.loc["total", "params"] == sum(p.numel() for p in model.parameters())


def test_plot_writes_decodable_png(tmp_path):
    for name, report in [("lenet", inspect_model("lenet5")),
                         ("mnv3", inspect_model(_timm("mobilenetv3_small_100"), input_size=(3, 64, 64)))]:
        path = report.plot(tmp_path / f"{name}.png")
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0  # not a blank canvas
    text = inspect_model(reference_model("lenet5")).to_string()  # default input size from the reference net
    assert text.startswith("lenet5 at input 1x32x32") and "117,600" in text


@pytest.mark.parametrize("n_train,domain", [(240, "natural"), (3000, "microscopy"), (20, "fluorescence")])
def test_frozen_trainable_split_follows_the_freeze_plan(n_train, domain):
    import timm

    from finetune import freeze
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    plan = freeze.auto(model, n_train=n_train, n_classes=10, domain=domain)
    epoch = max(g.train_from or 0 for g in plan.groups)
    freeze.apply(model, plan, epoch)
    report = inspect_model(model, (3, 64, 64))
    fixed = sum(g.numel for g in plan.groups if not g.trains_at(epoch))
    assert report.totals.loc["frozen", "params"] == fixed
    assert report.totals.loc["trainable", "params"] == sum(g.numel for g in plan.groups) - fixed
    assert report.stages["trainable"].tolist() == [g.trains_at(epoch) for g in plan.groups]
    assert report.totals.loc["frozen", "bwd_ops"] == 0  # a fixed prefix costs its forward pass only
