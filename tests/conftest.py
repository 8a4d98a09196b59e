"""Shared test settings: offline, few threads, deterministic seeds."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("FINETUNE_HOME", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "finetune_home"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
