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
