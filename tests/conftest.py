"""Test-suite settings: deterministic CPU runs, Triton's interpreter when no GPU is present."""
import os

# Triton reads this when a kernel is decorated, so set it before any metazoo.kernels import.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The apps the end-to-end tests start inherit this: at torch's default (one thread per core) two such
# processes under `-n 2` spin-wait against each other, ~5x the CPU time per training step.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


def _interpreter_rounds_bf16_to_nearest_even() -> None:
    """Triton's interpreter (3.6-3.8) truncates fp32 -> bf16 casts (and its RTNE path drops the carry);
    the GPU rounds to nearest even. Kernels' bf16 results on CPU then carry about twice the GPU's
    rounding error. Give the interpreter the GPU's rounding (test_kernels checks it)."""
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    builder = interp.InterpreterBuilder
    cast, to_fp = builder.cast_impl, builder.create_fp_to_fp

    def rne(src):
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
        return interp.TensorHandle(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16), tl.bfloat16)

    def is_bf16_downcast(src, dst_type):
        return src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16

    builder.cast_impl = lambda self, src, dst: rne(src) if is_bf16_downcast(src, dst) else cast(self, src, dst)
    builder.create_fp_to_fp = lambda self, src, dst, mode: (rne(src) if is_bf16_downcast(src, dst)
                                                            else to_fp(self, src, dst, mode))


if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    else:
        _interpreter_rounds_bf16_to_nearest_even()


def pytest_configure(config):
    """Under xdist, hand tests out one at a time (two queued per worker) rather than a quarter of the
    suite per worker up front, so that the slow tests (collected first, below) spread over the workers."""
    if config.pluginmanager.hasplugin("xdist") and config.getoption("maxschedchunk", None) is None:
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(items):
    """Run the slow end-to-end tests first: under xdist none of them is left running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
