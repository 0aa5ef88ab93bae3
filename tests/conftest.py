"""Shared test settings: quiet libraries, a fixed seed, and an isolated build folder per session."""

import os

import pytest
import torch

import qlora_lab  # noqa: F401  (quiets transformers and bitsandbytes)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tmp_build(tmp_path, monkeypatch):
    """Point QLORA_LAB_BUILD at a temporary folder so tests never touch build/."""
    monkeypatch.setenv("QLORA_LAB_BUILD", str(tmp_path / "build"))
    return tmp_path / "build"


def pytest_collection_modifyitems(config, items):
    """Run unit tests before the (slow) notebooks so failures show up early."""
    items.sort(key=lambda item: item.fspath.ext == ".ipynb")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
