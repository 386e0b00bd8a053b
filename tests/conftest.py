"""Test-suite settings: deterministic CPU runs, Triton's interpreter when no GPU is present."""
import os

# Triton reads this when a kernel is decorated, so set it before any metazoo.kernels import.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
