"""The switches that exist for GPUs, trained on one: bf16 and 16-bit mixed precision, channels_last, torch.compile
with inductor, and the feature cache computed on the device.

Skipped without CUDA. ``benchmarks/gpu_check.sh`` runs them on a GPU; ``FINETUNE_GPU_DRY_RUN=1`` (what
``gpu_check.sh --cpu-dry-run`` sets in CI) runs the same tests on the CPU so that they cannot rot before a GPU
meets them: there the device is the CPU, 16-mixed falls back to bf16 (as ``fit`` does without a GPU) and compile
uses the aot_eager backend (inductor needs minutes on a small CPU).
"""
import functools
import os

import pytest
import torch

from conftest import Seen
from finetune import cache, fit
from finetune.run import load_checkpoint

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not (CUDA or os.environ.get("FINETUNE_GPU_DRY_RUN") == "1"),
                                reason="needs CUDA (benchmarks/gpu_check.sh; FINETUNE_GPU_DRY_RUN=1 runs it on the CPU)")
DEVICE = "cuda" if CUDA else "cpu"
TINY = ["train.epochs=1", "image.size=32", "train.batch_size=16", "train.num_workers=0",
        f"train.accelerator={'gpu' if CUDA else 'cpu'}", "train.devices=1"]


def _train(textures, tmp_path, *extra, name="r"):
    seen = Seen()
    run = fit(textures, "natural", out=tmp_path, name=name, progress=False, callbacks=[seen],
              overrides=TINY + ["freeze.mode=full", *extra])
    assert seen.seen["moved"] and torch.isfinite(torch.tensor(seen.seen["loss"]))
    assert seen.seen["device"] == DEVICE
    return run, seen.seen


def test_bf16_mixed_trains_on_the_device_and_saves_float32_weights(textures, tmp_path):
    run, seen = _train(textures, tmp_path, "train.precision=bf16-mixed")
    assert seen["logits"] == torch.bfloat16 and not seen["scaler"]
    state = load_checkpoint(run.checkpoint("last"))["state_dict"]
    assert state["model.conv_stem.weight"].dtype == torch.float32


def test_16_mixed_trains_in_float16_with_a_grad_scaler(textures, tmp_path):
    _, seen = _train(textures, tmp_path, "train.precision=16-mixed")
    if CUDA:
        assert seen["logits"] == torch.float16 and seen["scaler"]
    else:  # fit falls back to bf16-mixed without a GPU
        assert seen["logits"] == torch.bfloat16


def test_channels_last_on_the_device(textures, tmp_path):
    _, seen = _train(textures, tmp_path, "train.channels_last=true", "train.precision=bf16-mixed")
    assert seen["input_cl"] and seen["stem_cl"]


def test_compile_trains_through_the_compiled_graph(textures, tmp_path, monkeypatch):
    from torch._dynamo import lookup_backend

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("inductor" if CUDA else "aot_eager")(gm, example_inputs)

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting))
    torch._dynamo.reset()
    try:
        _train(textures, tmp_path, "train.compile=true", "train.precision=bf16-mixed")
    finally:
        torch._dynamo.reset()
    assert graphs, "train.compile=true did not run the model through torch.compile"


def test_feature_cache_is_computed_on_the_device_then_read_back(textures, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))  # an empty cache
    devices = []
    real = cache.extract

    def spy(model, loader, device="cpu"):
        devices.append(torch.device(device).type)
        feats, labels = real(model, loader, device)
        devices.append(next(model.parameters()).device.type)
        return feats, labels

    monkeypatch.setattr(cache, "extract", spy)
    probe = ["freeze.mode=probe", "train.cache_features=true"]
    first = fit(textures, "natural", out=tmp_path, name="a", progress=False, overrides=TINY + probe)
    assert devices and set(devices) == {DEVICE}
    assert first.read_json("features.json")["hit"] is False
    second = fit(textures, "natural", out=tmp_path, name="b", progress=False, overrides=TINY + probe)
    assert second.read_json("features.json")["hit"] is True
