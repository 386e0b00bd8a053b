"""Test-suite settings: deterministic CPU runs, Triton's interpreter when no GPU is present."""
import os

# Triton reads this when a kernel is decorated, so set it before any metazoo.kernels import.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import metazoo  # noqa: E402

# The repository root is the ``metazoo`` package (package-dir = {"metazoo" = "."}), so pytest sees
# it as a package named after the checkout folder and imports its ``__init__`` under that name.
# Alias that name to the installed package so every module is imported (and registered) once.
sys.modules.setdefault(Path(metazoo.__file__).resolve().parent.name, metazoo)


# two xdist workers on two cores: one intra-op thread each avoids oversubscription
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
