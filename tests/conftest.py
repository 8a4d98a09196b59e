"""Shared test settings: offline, few threads, deterministic seeds."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("FINETUNE_HOME", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "finetune_home"))

import pytest  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from finetune.train import REFIT_BELOW  # noqa: E402  (as shipped, before the session's patch)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _no_auto_refit():
    """``train.refit: auto`` would fit every tiny test set twice: the tests' fits (module and session fixtures
    included) skip it, except in tests marked ``refit``; subprocesses do not see this patch, and
    ``train.refit: true`` still refits."""
    import finetune.train
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(finetune.train, "REFIT_BELOW", 0)
        yield


@pytest.fixture(autouse=True)
def _refit_as_shipped(request, monkeypatch):
    if "refit" in request.keywords:
        monkeypatch.setattr("finetune.train.REFIT_BELOW", REFIT_BELOW)


@pytest.fixture
def one_thread():
    """One intra-op thread: on two shared cores, two threads ran tiny training steps 20x slower (spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def textures(tmp_path_factory):
    """A real 3-class image folder (scikit-image's textures), made once per session."""
    from finetune.examples import texture_folder
    return texture_folder(tmp_path_factory.mktemp("data") / "tex")


@pytest.fixture(scope="session")
def tiny_run(textures, tmp_path_factory):
    """One trained run (1 epoch, 32 px) shared by the evaluation and export tests; they only add folders to it."""
    from finetune import fit
    return fit(textures, "natural", out=tmp_path_factory.mktemp("runs"), name="r",
               overrides=["train.epochs=1", "image.size=32", "train.num_workers=0"], progress=False)


class Seen(pl.Callback):
    """What the first training step saw (the logits' dtype, the input's device and memory format, the stem's, whether
    a grad scaler ran) and whether the stem's weights moved; shared by the speed-path and GPU tests."""

    def on_fit_start(self, trainer, pl_module):
        self.seen, model = {}, pl_module.model
        self.start = model.conv_stem.weight.detach().clone()
        model.get_classifier().register_forward_hook(self._logits)
        model.conv_stem.register_forward_pre_hook(self._input)
        self.seen["scaler"] = getattr(trainer.precision_plugin, "scaler", None) is not None

    def _logits(self, module, args, out):  # returns None: a hook's return value would replace the output
        self.seen.setdefault("logits", out.dtype)

    def _input(self, module, args):
        self.seen.setdefault("device", args[0].device.type)
        self.seen.setdefault("input_cl", args[0].is_contiguous(memory_format=torch.channels_last))
        self.seen.setdefault("stem_cl", module.weight.is_contiguous(memory_format=torch.channels_last))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.setdefault("loss", outputs["loss"].item())

    def on_fit_end(self, trainer, pl_module):
        self.seen["moved"] = not torch.equal(pl_module.model.conv_stem.weight.detach().cpu(), self.start.cpu())
