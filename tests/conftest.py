"""Suite-wide settings: small problems run faster on one thread, and a 2-core CI machine
shared with Lightning's worker threads thrashes with more."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts with one intra-op thread, and whatever a test sets is undone."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where a GPU is present and are deselected elsewhere."""
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("cuda") is not None]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if item.get_closest_marker("cuda") is None]
