"""Shared test settings: quiet libraries, a fixed seed, and an isolated build folder per session."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

import qlora_lab

qlora_lab.quiet()  # no progress bars or library notices in the test output

# Tests and the notebooks nbval executes write here, never into the checkout's build/ that `make course` uses.
# Set before any kernel starts, so nbval's kernels inherit it; removed when the session ends (it is ours).
_TEST_BUILD = tempfile.mkdtemp(prefix="qlora-lab-test-build-")
os.environ["QLORA_LAB_BUILD"] = _TEST_BUILD
os.environ.pop("QLORA_LAB_RESULTS", None)
atexit.register(shutil.rmtree, _TEST_BUILD, True)


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
