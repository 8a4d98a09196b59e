"""Feature caching for linear probes: the key covers model, weights, preprocessing and data; a second run reads
the cache; training on cached features gives the uncached probe's result."""
import os

import pandas as pd
import pytest
import timm
import torch

from finetune import cache, fit, freeze
from finetune.examples import texture_folder
from finetune.predict import Predictor
from finetune.recipe import Recipe
from finetune.run import load_checkpoint

# a probe whose training pipeline is the evaluation pipeline: caching must change nothing but speed
PROBE = ["freeze.mode=probe", "augment.crop=resize", "augment.eval_crop=resize", "augment.transforms=[]",
         "backbone.drop_rate=0.0", "train.epochs=2", "image.size=32", "train.batch_size=16", "train.num_workers=0"]


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    return texture_folder(tmp_path_factory.mktemp("data") / "textures", patch=64, val_every=4)


@pytest.fixture()
def items(tmp_path):
    paths = []
    for i, label in enumerate(["a", "a", "b"]):
        p = tmp_path / f"{i}.png"
        p.write_bytes(b"x" * (10 + i))
        paths.append(str(p))
    return pd.DataFrame({"path": paths, "label": ["a", "a", "b"], "split": ["train", "val", "train"]})


def test_key_changes_with_model_weights_preprocess_and_data(items):
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    pre = {"channels": 3, "config": {"input_size": [3, 32, 32], "mean": [0.5] * 3}}

    def key(m=model, name="resnet18", p=pre, it=items):
        return cache.cache_key(name, cache.weights_hash(m), p, it)

    base = key()
    assert key() == base and len(base) == 64
    assert key(name="resnet34") != base
    with torch.no_grad():
        model.layer1[0].conv1.weight[0, 0, 0, 0] += 1e-3
    changed = key()
    assert changed != base
    with torch.no_grad():
        model.layer1[0].bn1.running_var[0] += 1e-3  # BN statistics are weights too (AdaBN changes them)
    assert key() != changed
    base = key()
    with torch.no_grad():
        model.fc.weight.zero_()  # the head does not change the features
    assert key() == base
    assert key(p={**pre, "config": {**pre["config"], "mean": [0.4] * 3}}) != base
    assert key(it=items.assign(label=["a", "b", "b"])) != base
    assert key(it=items.assign(split=["train", "train", "train"])) != base
    assert key(it=items.iloc[:2]) != base
    st = os.stat(items["path"][0])
    os.utime(items["path"][0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    touched = key()
    assert touched != base
    with open(items["path"][1], "ab") as f:
        f.write(b"y")
    assert key() != touched


def test_auto_caches_only_what_changes_nothing_but_speed():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    probe, partial = freeze.probe(model), freeze.fixed(model, 2)
    same, aug = {"transforms": ["Resize"]}, {"transforms": ["RandomResizedCrop"]}
    auto, on, off = Recipe(), Recipe().override(["train.cache_features=true"]), Recipe().override(
        ["train.cache_features=false"])
    assert cache.decide(auto, probe, same, same)[0]
    assert not cache.decide(auto, probe, aug, same)[0]
    assert not cache.decide(auto, partial, same, same)[0]
    assert not cache.decide(off, probe, same, same)[0]
    use, why = cache.decide(on, probe, aug, same)
    assert use and "augmentation" in why
    assert not cache.decide(on, partial, same, same)[0]
    live_bn = freeze.probe(model, bn_fixed="train")
    assert not cache.decide(auto, live_bn, same, same)[0] and cache.decide(on, live_bn, same, same)[0]


def _head(run) -> dict:
    state = load_checkpoint(run.checkpoint("last"))["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("model.classifier.")}


def test_cached_probe_equals_uncached_and_second_run_reads_the_cache(textures, tmp_path, monkeypatch):
    plain = fit(textures, "natural", out=tmp_path, name="plain", overrides=PROBE + ["train.cache_features=false"],
                progress=False)
    assert not (plain.path / "features.json").exists()
    first = fit(textures, "natural", out=tmp_path, name="first", overrides=PROBE, progress=False)
    info = first.read_json("features.json")
    assert info["hit"] is False and os.path.isfile(info["path"])
    assert info["images"] == {"train": 144, "val": 48}
    for k, v in _head(plain).items():
        torch.testing.assert_close(_head(first)[k], v, rtol=1e-4, atol=1e-5)
    assert first.summary["final_metrics"]["val_acc"] == pytest.approx(plain.summary["final_metrics"]["val_acc"])
    assert first.summary["final_metrics"]["val_loss"] == pytest.approx(plain.summary["final_metrics"]["val_loss"],
                                                                       abs=1e-4)
    # the checkpoint holds the whole timm model: predicting images needs no cache
    a, b = Predictor.load(plain.path, checkpoint="last"), Predictor.load(first.path, checkpoint="last")
    assert set(load_checkpoint(first.checkpoint("last"))["state_dict"]) == set(
        load_checkpoint(plain.checkpoint("last"))["state_dict"])
    x = torch.stack([a.preprocess.load(p) for p in plain.items["path"][:8]])
    torch.testing.assert_close(b.predict(x), a.predict(x), rtol=1e-4, atol=1e-5)

    def no_backbone(*args, **kw):
        raise AssertionError("the backbone ran although the features were cached")

    monkeypatch.setattr(cache, "extract", no_backbone)
    second = fit(textures, "natural", out=tmp_path, name="second", overrides=PROBE, progress=False)
    assert second.read_json("features.json") == {**info, "hit": True}
    for k, v in _head(first).items():
        torch.testing.assert_close(_head(second)[k], v, rtol=0, atol=0)


def test_forced_cache_trains_an_augmented_probe(textures, tmp_path):
    overrides = ["freeze.mode=probe", "train.cache_features=true", "train.epochs=1", "image.size=32",
                 "train.batch_size=16", "train.num_workers=0"]
    run = fit(textures, "natural", out=tmp_path, name="forced", overrides=overrides, progress=False)
    assert run.read_json("features.json")["images"]["train"] == 144
    assert run.summary["final_metrics"]["val_acc"] > 0.5
