"""The GPU speed switches, exercised on the CPU: bf16 autocast, channels_last and torch.compile each train."""
import functools
import os

import pytest
import torch

from conftest import Seen
from finetune import fit
from finetune.examples import texture_folder
from finetune.run import load_checkpoint

FAST = ["train.epochs=1", "image.size=32", "train.batch_size=16", "train.num_workers=0", "freeze.mode=full"]


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    return texture_folder(tmp_path_factory.mktemp("data") / "textures", patch=64, val_every=4)


def _train(textures, tmp_path, *extra):
    seen = Seen()
    run = fit(textures, "natural", out=tmp_path, name="r", overrides=FAST + list(extra), progress=False,
              callbacks=[seen])
    assert seen.seen["moved"] and torch.isfinite(torch.tensor(seen.seen["loss"]))
    return run, seen.seen


def test_bf16_mixed_trains_in_bfloat16_and_saves_float32_weights(textures, tmp_path):
    run, seen = _train(textures, tmp_path, "train.precision=bf16-mixed")
    assert seen["logits"] == torch.bfloat16
    state = load_checkpoint(run.checkpoint("last"))["state_dict"]
    assert state["model.conv_stem.weight"].dtype == torch.float32


def test_channels_last_trains_with_channels_last_weights_and_inputs(textures, tmp_path):
    _, seen = _train(textures, tmp_path, "train.channels_last=true")
    assert seen["input_cl"] and seen["stem_cl"] and seen["logits"] == torch.float32


def test_compile_trains_through_the_captured_graph(textures, tmp_path, monkeypatch):
    """The compile switch, with AOTAutograd but without inductor's C++ code generation (see the next test)."""
    from torch._dynamo import lookup_backend

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting))
    torch._dynamo.reset()
    _train(textures, tmp_path, "train.compile=true")
    assert graphs, "train.compile=true did not run the model through torch.compile"


@pytest.mark.skipif(not os.environ.get("FINETUNE_SLOW_TESTS"),
                    reason="inductor needs 1-4 minutes to compile tf_efficientnet_lite0 on a 2-core CPU (measured: "
                           "68 s idle, 234 s under load); set FINETUNE_SLOW_TESTS=1 to run it")
def test_compile_with_inductor_trains(textures, tmp_path):
    torch._dynamo.reset()
    _train(textures, tmp_path, "train.compile=true")
