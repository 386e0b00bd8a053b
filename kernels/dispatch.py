"""Choose between a kernel's Triton implementation and its plain PyTorch reference.

Precedence: the call's ``backend`` argument, then :func:`use_backend` (context), then the
``METAZOO_KERNELS`` environment variable, then ``auto`` (Triton when the tensors live on a CUDA
device and Triton imports; otherwise the reference). ``TRITON_INTERPRET=1`` lets an explicit
``backend="triton"`` run on CPU tensors, which is how the test suite checks kernels without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "METAZOO_KERNELS"

_state = threading.local()


def _check(backend: str, what: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{what}={backend!r} is not a kernel backend; accepted values: {', '.join(BACKENDS)}")
    return backend


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


_TRITON: bool | None = None


def triton_available() -> bool:
    """True when Triton imports (it is optional: the package runs without it). Probed once."""
    global _TRITON
    if _TRITON is None:
        _TRITON = _probe_triton()
    return _TRITON


def lazy_triton(build):
    """Decorate a kernel module's builder ``build(triton, tl) -> kernels``: it runs once, on the first
    launch, so importing the module never imports Triton; later calls return the same kernels."""

    @functools.cache
    def load():
        import triton
        import triton.language as tl

        return build(triton, tl)

    return load


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def use_backend(backend: str):
    """Context manager forcing a backend for every kernel call inside it (thread-local)."""
    _check(backend, "backend")
    prev = getattr(_state, "backend", None)
    _state.backend = backend
    try:
        yield
    finally:
        _state.backend = prev


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for, before looking at devices: argument > context > env > 'auto'."""
    if backend is not None:
        return _check(backend, "backend")
    ctx = getattr(_state, "backend", None)
    if ctx is not None:
        return ctx
    return _check(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


def resolve(backend: str | None = None, *tensors: torch.Tensor) -> str:
    """Return ``'triton'`` or ``'torch'`` for a call on ``tensors``.

    ``auto`` picks Triton only for CUDA tensors when Triton is importable. An explicit
    ``triton`` on CPU tensors needs the interpreter; otherwise it is an error, never a silent
    fallback. Under ``torch.compile`` the answer is a trace-time constant (no graph break).
    """
    return _resolve(backend, all(t.is_cuda for t in tensors) if tensors else False)


@torch.compiler.assume_constant_result
def _resolve(backend: str | None, on_cuda: bool) -> str:
    want = requested_backend(backend)
    if want == "torch":
        return "torch"
    if want == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(f"{ENV_VAR}/backend='triton' was requested but Triton is not importable")
    if not on_cuda and not interpret_mode():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter); "
            "use backend='torch' or move the tensors to a CUDA device")
    return "triton"


_fx_symbolic_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing)


def fx_tracing() -> bool:
    """True while ``torch.fx`` traces symbolically (not under torch.compile/export): models then take
    their plain-PyTorch path, so graphs hold standard ops and no control flow runs on traced values.
    Callers write ``torch.jit.is_scripting() or fx_tracing()``: TorchScript compiles only the branch
    that literal selects."""
    if torch.jit.is_scripting():
        return False
    return _fx_symbolic_tracing()
