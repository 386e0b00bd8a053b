"""Builds mmcv 2.1.0's ``_ext`` in place with every op binding plus the CUDA ops Mask R-CNN runs.

A full CUDA build of mmcv compiles ~60 CUDA files, longer than one device call allows. The dense
GPU benchmark needs only nms and RoIAlign (forward and backward) on CUDA; this builds all of mmcv's
C++ bindings and CPU ops (so every ``mmcv.ops`` module imports) and those two CUDA ops. Any other op
called on a CUDA tensor fails with mmcv's own "no implementation for device" error, never silently.

Usage (on the GPU machine, in an unpacked mmcv-2.1.0 sdist):
``MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 python bench/mmcv_cuda_subset.py /tmp/mmcv-2.1.0``,
then put that folder on ``PYTHONPATH``.
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

CUDA_OPS = ("nms_cuda.cu", "roi_align_cuda.cu")
# cudabind.cpp holds one block of declarations + REGISTER_DEVICE_IMPL lines per op; these regexes
# cut out the blocks of the ops in CUDA_OPS.
BIND_BLOCKS = (
    r"Tensor NMSCUDAKernelLauncher\(.*?REGISTER_DEVICE_IMPL\(nms_impl, CUDA, nms_cuda\);",
    r"void ROIAlignForwardCUDAKernelLauncher\(.*?REGISTER_DEVICE_IMPL\(roi_align_backward_impl, CUDA,\s*roi_align_backward_cuda\);",
)


def subset_bindings(cudabind: str) -> str:
    """The registration source for the CUDA_OPS only, cut from mmcv's ``cudabind.cpp``."""
    blocks = []
    for pattern in BIND_BLOCKS:
        m = re.search(pattern, cudabind, flags=re.S)
        if m is None:
            raise SystemExit(f"cudabind.cpp: no block matching {pattern[:40]!r}; is this mmcv 2.1.0?")
        blocks.append(m.group(0))
    return '#include "pytorch_cpp_helper.hpp"\n#include "pytorch_device_registry.hpp"\n\n' + "\n\n".join(blocks) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="unpacked mmcv-2.1.0 sdist")
    src = p.parse_args().src.resolve()
    csrc = src / "mmcv" / "ops" / "csrc"
    subset_dir = csrc / "pytorch" / "cuda_subset"
    subset_dir.mkdir(exist_ok=True)
    (subset_dir / "cudabind_subset.cpp").write_text(subset_bindings((csrc / "pytorch/cuda/cudabind.cpp").read_text()))

    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.chdir(src)
    sources = sorted(str(f.relative_to(src)) for f in (csrc / "pytorch").glob("*.cpp"))
    sources += sorted(str(f.relative_to(src)) for f in (csrc / "pytorch" / "cpu").glob("*.cpp"))
    sources += [f"mmcv/ops/csrc/pytorch/cuda/{name}" for name in CUDA_OPS]
    sources.append("mmcv/ops/csrc/pytorch/cuda_subset/cudabind_subset.cpp")
    include = [str(csrc / d) for d in ("pytorch", "common", "common/cuda")]
    ext = CUDAExtension("mmcv._ext", sources, include_dirs=include, extra_compile_args={"cxx": [], "nvcc": []})
    setup(name="mmcv-ext-subset", ext_modules=[ext], cmdclass={"build_ext": BuildExtension},
          script_args=["build_ext", "--inplace"])


if __name__ == "__main__":
    main()
