"""Stages of timm models, the freeze plan, BN modes, schedules and the automatic rule."""
import copy

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune import freeze
from finetune.optim import lr_factor, param_groups
from finetune.stages import stages

FAMILIES = ["resnet18", "tf_efficientnet_lite0", "mobilenetv2_100", "mobilenetv3_small_100", "convnext_atto",
            "vit_tiny_patch16_224", "regnety_002"]


def _model(name="tf_efficientnet_lite0", **kw):
    return timm.create_model(name, pretrained=False, num_classes=3, **kw)


@pytest.fixture(scope="module")
def lite0():
    return _model()


@pytest.mark.parametrize("name", FAMILIES)
def test_stages_cover_every_parameter_once_in_order(name):
    model = _model(name)
    groups = stages(model)
    names = [n for n, _ in model.named_parameters()]
    flat = [p for g in groups for p in g.params]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
    assert groups[0].kind == "stem" and groups[-1].kind == "head"
    assert len(groups) >= 4
    head = {f"{n}" for n, _ in model.named_parameters()
            if any(p is q for q in model.get_classifier().parameters() for p in [dict(model.named_parameters())[n]])}
    assert set(groups[-1].params) == head
    # stages run from input to output: the first parameter of each group comes later in the model
    first = [names.index(g.params[0]) for g in groups[:-1]]
    assert first == sorted(first)


def test_param_groups_exist_up_front_and_unfreezing_never_adds_groups(lite0):
    model = copy.deepcopy(lite0)
    plan = freeze.make_plan(model, 5, schedule="lp-ft", epochs=4, probe_epochs=2)
    assert [g.train_from for g in plan.groups] == [None] * 5 + [2] * 3 + [0]
    opt = torch.optim.AdamW(param_groups(model, plan, 1e-3))
    n_groups = len(opt.param_groups)
    assert [g["stage"] for g in opt.param_groups] == [i // 2 for i in range(2 * len(stages(model)))]

    def live():  # per stage, whether any of its parameters trains
        return [any(p.requires_grad for g in opt.param_groups if g["stage"] == i for p in g["params"])
                for i in range(len(plan.groups))]

    freeze.apply(model, plan, 0)
    assert live() == [False] * 8 + [True]
    freeze.apply(model, plan, 2)
    assert live() == [False] * 5 + [True] * 4
    assert len(opt.param_groups) == n_groups
    assert plan.lr_mults(0)[5] == 0.0 and plan.lr_mults(2)[5] > 0


def _bn_state(model, group):
    mods = dict(model.named_modules())
    return {f"{m}.{k}": v.clone() for m in group.modules for k, v in mods[m].state_dict().items()}


def _module(model, plan):
    from finetune.module import Classifier
    from finetune.recipe import Recipe
    return Classifier(model, plan, Recipe(), ["a", "b", "c"])


def test_frozen_bn_is_held_by_the_modules_train_without_hooks(lite0):
    model = copy.deepcopy(lite0)
    plan = freeze.make_plan(model, 3, bn_fixed="frozen")
    freeze.apply(model, plan)
    before = _bn_state(model, plan.groups[0])
    module = _module(model, plan).train()  # what Lightning calls every epoch
    assert not model.bn1.training and not model.blocks[1].training and model.blocks[5].training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    model(torch.randn(4, 3, 64, 64) * 3 + 1)
    after = _bn_state(model, plan.groups[0])
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a trained group's BN in 'train' mode does move
    top = plan.groups[-2]
    b2 = _bn_state(model, top)
    model(torch.randn(4, 3, 64, 64) * 3 + 1)
    a2 = _bn_state(model, top)
    assert any(not torch.equal(b2[k], a2[k]) for k in b2 if "running_mean" in k)


def test_adapt_reestimates_statistics_then_fixes_them(lite0):
    model = copy.deepcopy(lite0)
    plan = freeze.make_plan(model, 2, bn_fixed="adapt")
    freeze.apply(model, plan)
    bn = model.bn1
    old = bn.running_mean.clone()
    data = [torch.randn(8, 3, 32, 32) * 2 + 0.5 for _ in range(3)]
    seen = freeze.adapt_bn(model, plan, data)
    assert seen == 24 and plan.adapted
    assert not torch.allclose(bn.running_mean, old)
    # AdaBN estimate equals the statistics of the stem conv output on exactly those images
    with torch.no_grad():
        z = torch.cat([model.conv_stem(x) for x in data])
    torch.testing.assert_close(bn.running_mean, z.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    fixed_stats = bn.running_mean.clone()
    _module(model, plan).train()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(bn.running_mean, fixed_stats)


def test_affine_trains_only_bn_scale_and_shift(lite0):
    model = copy.deepcopy(lite0)
    plan = freeze.make_plan(model, 8, bn_fixed="affine")
    freeze.apply(model, plan)
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "bn1.weight" in grads and "bn1.bias" in grads
    assert "conv_stem.weight" not in grads and "blocks.0.0.conv_dw.weight" not in grads
    assert plan.lr_mults(0)[0] > 0


def test_freezing_is_exact_after_training(lite0):
    model = copy.deepcopy(lite0)
    plan = freeze.make_plan(model, 4)
    freeze.apply(model, plan)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(param_groups(model, plan, 1e-2, weight_decay=0.1))
    _module(model, plan).train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for g in plan.groups:
        keys = [k for k in before if any(k == m or k.startswith(m + ".") for m in g.modules)]
        same = all(torch.equal(before[k], after[k]) for k in keys)
        assert same == (g.train_from is None), g.name


def test_frozen_prefix_builds_no_autograd_graph(lite0):
    model = copy.deepcopy(lite0)
    plan = freeze.make_plan(model, 4)
    freeze.apply(model, plan)
    seen = {}
    model.blocks[2].register_forward_hook(lambda m, i, o: seen.update(prefix=o.requires_grad))
    model.blocks[3].register_forward_hook(lambda m, i, o: seen.update(trained=o.requires_grad))
    model.train()
    model(torch.randn(2, 3, 32, 32))
    assert seen == {"prefix": False, "trained": True}


def test_gradual_schedule_releases_one_group_per_epoch(lite0):
    plan = freeze.make_plan(lite0, 5, schedule="gradual", epochs=6)
    starts = [g.train_from for g in plan.groups]
    assert starts == [None] * 5 + [3, 2, 1, 0]
    assert [sum(plan.trainable(e)) for e in range(5)] == [1, 2, 3, 4, 4]


@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 8, 20])
@pytest.mark.parametrize("schedule", ["gradual", "lp-ft"])
def test_schedules_fit_the_epoch_budget_and_explain_agrees(lite0, schedule, epochs):
    """No group starts at or after the last epoch; fixed_depth, the table and the reasons say the same."""
    plan = freeze.auto(lite0, n_train=30_000, n_classes=3, domain="microscopy", epochs=epochs, schedule=schedule,
                       probe_epochs=epochs)
    starts = [g.train_from for g in plan.groups if g.train_from is not None]
    assert max(starts) <= max(0, epochs - 2)
    assert plan.fixed_depth == sum(g.train_from is None for g in plan.groups)
    text = plan.explain()
    if epochs < 3:
        assert plan.schedule == "none" and "needs at least 3 epochs" in text
    else:
        assert plan.schedule == schedule and f"from epoch {max(starts)}" in text
        if schedule == "gradual" and epochs - 2 < 8:
            assert "start at or after the last epoch" in text
        if schedule == "lp-ft" and epochs > 2:
            assert "capped from" in text
    assert not any(f"from epoch {e}" in text for e in range(max(1, epochs - 1), 30))


def test_lr_factors_follow_the_plan(lite0):
    plan = freeze.make_plan(lite0, 5, schedule="lp-ft", epochs=4, probe_epochs=1, base_mult=0.1, decay=0.5)
    lam = [lr_factor(g, steps_per_epoch=10, epochs=4, warmup_epochs=1) for g in plan.groups]
    assert all(lam[i](s) == 0.0 for i in range(5) for s in range(40))
    assert lam[7](5) == 0.0 and lam[7](10) > 0  # released after the probe epoch, with its own warm-up
    assert lam[8](0) > 0
    assert lam[6](25) == pytest.approx(lam[7](25))  # one curve; the multiplier is the group's lr
    lr = {g["name"]: g["lr"] for g in param_groups(lite0, plan, 1e-3)}
    names = [g.name for g in plan.groups]
    assert lr[names[6]] == pytest.approx(lr[names[7]] * 0.5) and lr["head"] == lr["head/no_decay"] == 1e-3
    assert lam[8](39) < lam[8](15)  # cosine decays


def test_plan_state_round_trips_and_refuses_another_model(lite0):
    plan = freeze.auto(lite0, n_train=300, n_classes=3, domain="microscopy")
    plan.adapted = True
    back = freeze.Plan.from_state_dict(plan.state_dict())
    assert back == plan
    with pytest.raises(ValueError, match="another model"):
        param_groups(_model("resnet18"), back, 1e-3)


def test_explanation_reads_with_numbers(lite0):
    plan = freeze.auto(lite0, n_train=240, n_classes=10, distance=0.62)
    text = plan.explain()
    assert "24 images a class" in text and "0.62" in text
    assert "BatchNorm" in text and "head" in text and "1x" in text and "trade-off" in text


def _depth(plan):
    return plan.fixed_depth


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 100_000), k=st.integers(2, 100), d=st.floats(0, 1), more=st.integers(1, 100_000),
       dd=st.floats(0, 1))
def test_auto_is_monotone(lite0, n, k, d, more, dd):
    """More data or a farther domain never fixes more, never lowers the backbone's learning rates."""
    base = freeze.auto(lite0, n_train=n, n_classes=k, distance=d)
    more_data = freeze.auto(lite0, n_train=n + more, n_classes=k, distance=d)
    farther = freeze.auto(lite0, n_train=n, n_classes=k, distance=min(1.0, d + dd))
    assert _depth(more_data) <= _depth(base)
    assert _depth(farther) <= _depth(base)
    for a, b in zip(base.groups, farther.groups):
        if a.train_from is not None:
            assert b.lr_mult >= a.lr_mult - 1e-12
    assert freeze.trainable_share(n + more, k, d) >= freeze.trainable_share(n, k, d)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 100_000), d=st.floats(0, 1), more=st.integers(0, 100_000), dd=st.floats(0, 1))
def test_auto_bn_statistics_reestimated_only_when_most_of_the_network_trains_on_enough_images(lite0, n, d, more, dd):
    plan = freeze.auto(lite0, n_train=n, n_classes=2, distance=d)
    share = freeze.trainable_share(n, 2, d)
    assert all(g.bn == "frozen" for g in plan.groups if g.train_from is None)
    trained = [g.bn for g in plan.groups if g.train_from is not None and g.kind != "head"]
    retrain = share >= freeze.RETRAIN_BN_FROM and n / 2 >= freeze.RETRAIN_BN_PER_CLASS
    assert all(bn == ("train" if retrain else "frozen") for bn in trained)
    # monotone: more data or a farther domain never goes back to ImageNet's statistics
    bigger = freeze.auto(lite0, n_train=n + more, n_classes=2, distance=min(1.0, d + dd))
    if "train" in trained:
        assert all(g.bn == "train" for g in bigger.groups if g.train_from is not None and g.kind != "head")


def test_auto_extremes(lite0):
    assert freeze.auto(lite0, n_train=10, n_classes=10, domain="natural").is_probe
    full = freeze.auto(lite0, n_train=100_000, n_classes=10, domain="microscopy")
    assert full.fixed_depth == 0 and full.schedule == "lp-ft"
    with pytest.raises(ValueError, match="domain"):
        freeze.auto(lite0, n_train=10, n_classes=2, domain="xray")


def test_ddp_registers_exactly_the_parameters_that_may_ever_train(lite0):
    model = copy.deepcopy(lite0)
    plan = freeze.make_plan(model, 5, schedule="lp-ft", epochs=4, probe_epochs=1)
    assert plan.releases_later and not freeze.make_plan(model, 5).releases_later
    freeze.set_trainable(model, plan, None)
    needs = [any(dict(model.named_parameters())[p].requires_grad for p in g.params) for g in plan.groups]
    assert needs == [False] * 5 + [True] * 4
    # affine: only the BatchNorm scale/shift of fixed groups, never their convolutions
    affine = freeze.make_plan(model, 8, bn_fixed="affine")
    freeze.set_trainable(model, affine, None)
    live = {n for n, p in model.named_parameters() if p.requires_grad}
    assert live == freeze.trainable(model, affine, 0) and "bn1.weight" in live and "conv_stem.weight" not in live
    assert all(".bn" in n or n.startswith(("bn", "classifier")) for n in live) and not affine.releases_later


def test_explain_speaks_of_batchnorm_only_for_models_with_it():
    vit = _model("vit_tiny_patch16_224")
    for bn in ("auto", "affine", "adapt"):
        plan = freeze.auto(vit, n_train=300, n_classes=3, domain="microscopy", bn=bn)
        assert "BatchNorm" not in plan.explain() and {g.bn for g in plan.groups} == {"-"}
        assert [r["bn"] for r in plan.table()] == ["-"] * len(plan.groups)
    assert "BatchNorm" in freeze.auto(_model(), n_train=300, n_classes=3, domain="microscopy").explain()


def test_plan_table_says_what_batchnorm_does(lite0):
    plan = freeze.make_plan(lite0, 4, bn_fixed="frozen", bn_trained="frozen")
    bn = {r["group"]: r["bn"] for r in plan.table()}
    assert bn["head"] == "-" and bn["stem"] == "stats fixed, scale/shift fixed"
    assert bn["blocks.3"] == "stats fixed, scale/shift train"
    assert "stats fixed, scale/shift train" in plan.explain().splitlines()[-2]


def test_rule_is_a_pure_function_of_numbers():
    d = freeze.decide(240, 10, 8, distance=0.62, epochs=5, batch_size=8)
    assert d == freeze.decide(240, 10, 8, distance=0.62, epochs=5, batch_size=8)
    assert (d.depth, d.schedule, d.bn_fixed, d.bn_trained) == (4, "lp-ft", "frozen", "frozen")
    reasons = " ".join(freeze.explain(d))
    assert "batches of 8 < 16" in reasons and "0.52" in reasons
    big = freeze.decide(100_000, 10, 8, distance=0.9, batch_size=32)
    assert big.bn_trained == "train" and big.depth == 0
    assert freeze.decide(100_000, 10, 8, distance=0.9, batch_size=8).bn_trained == "frozen"  # batch too small


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "vit_tiny_patch16_224"])
def test_no_weight_decay_on_biases_norms_and_what_timm_exempts(name):
    model = _model(name)
    plan = freeze.make_plan(model, 2)
    groups = param_groups(model, plan, 1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())  # every parameter once
    exempt = set(getattr(model, "no_weight_decay", set)())
    for g in groups:
        assert g["name"].endswith("/no_decay") == (g["weight_decay"] == 0.0)
        for p in g["params"]:
            flat = p.ndim <= 1 or names[id(p)] in exempt
            assert (g["weight_decay"] == 0.0) == flat, names[id(p)]
    assert "bn1.weight" in seen if name.startswith("tf_") else "cls_token" in exempt
